"""DROCC (Goyal et al. 2020) for one or m normal classes: a classifier with adversarially searched negatives.

Written from the DROCC paper and the behaviour of its published trainer (EdgeML's DROCCTrainer):

- normal training items have label 1; the loss is BCE(logit(x), 1) + mu * BCE(logit(x_adv), 0);
- x_adv starts at x + N(0, I) and takes ``ascent_steps`` steps of size ``ascent_step_size`` along the
  per-item normalised gradient that *raises* BCE(logit, 0), i.e. towards points the network calls
  normal; every 10 steps, and after the last one (so short searches are projected too), h = x_adv - x
  is projected onto r <= ||h|| <= gamma * r;
- the first ``only_ce_epochs`` epochs use the BCE term alone; the learning rate is lr for the first
  40% of the remaining epochs, lr/10 to 80%, lr/100 after (the CIFAR example's schedule);
- the search runs with the network in training mode (BatchNorm batch statistics), as the published
  trainer's does;
- the published trainer keeps the epoch with the best *test* AUC; here the last epoch is kept, so no
  model selection ever looks at the test split.

Detector i of the grouped network only ever sees class i (per-class batches), so with m columns this
is DROCC(m) (Algorithm 1) and on the pooled task it is DROCC (Algorithm 2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

from training.batches import to_float
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import Task
from training.engine import TrainingInputs
from training.errors import UserError
from training.methods.deepmad import autocast
from training.methods.deepsvdd import class_batches
from training.networks import GroupedClassifier
from training.scorer import LogitScorer

PROJECT_EVERY = 10


@dataclass
class DROCCConfig:
    """Paper table 18 (r 8, mu 1, Adam 1e-3, ascent step 1e-3) and EdgeML's CIFAR command (gamma 1, batch 256)."""

    rep_dim: int = 128
    radius: float = 8.0
    gamma: float = 1.0
    mu: float = 1.0
    lr: float = 1e-3
    ascent_step_size: float = 1e-3
    ascent_steps: int = 50
    only_ce_epochs: int = 0
    batch_size: int = 256
    epochs: int = 40
    weight_decay: float = 0.0
    augment: bool = False
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def project(x: torch.Tensor, x_adv: torch.Tensor, radius: float, gamma: float) -> torch.Tensor:
    """Move each x_adv so that r <= ||x_adv - x|| <= gamma * r (norms over all but the first two dims)."""
    h = x_adv - x
    dims = tuple(range(2, h.dim()))
    norm = h.pow(2).sum(dims, keepdim=True).sqrt().clamp_min(1e-12)
    return x + h * (norm.clamp(radius, gamma * radius) / norm)


def adversarial_search(
    network: GroupedClassifier, x: torch.Tensor, config: DROCCConfig, generator: torch.Generator
) -> torch.Tensor:
    """Points in N(r) around each x [B, m, C, H, W] that the network scores most normal (detached)."""
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    x_adv = (x + noise).detach()
    dims = tuple(range(2, x.dim()))
    for step in range(config.ascent_steps):
        x_adv.requires_grad_(True)
        logits, _ = network(x_adv)
        loss = F.binary_cross_entropy_with_logits(logits.float(), torch.zeros_like(logits, dtype=torch.float32))
        (grad,) = torch.autograd.grad(loss, [x_adv])
        norm = grad.pow(2).sum(dims, keepdim=True).sqrt().clamp_min(1e-12)
        with torch.no_grad():
            x_adv = x_adv + config.ascent_step_size * grad / norm
            if (step + 1) % PROJECT_EVERY == 0 or step == config.ascent_steps - 1:
                x_adv = project(x, x_adv, config.radius, config.gamma)
    if config.ascent_steps == 0:
        x_adv = project(x, x_adv, config.radius, config.gamma)
    return x_adv.detach()


def drocc_loss(
    network: GroupedClassifier, x: torch.Tensor, config: DROCCConfig, generator: torch.Generator, adversarial: bool
) -> tuple[torch.Tensor, float, float]:
    """Sum over detectors of BCE(normal, 1) [+ mu * BCE(adversarial, 0)]; returns (loss, ce, adv)."""
    with autocast(x.device):
        logits, _ = network(x)
    ce = F.binary_cross_entropy_with_logits(logits.float(), torch.ones_like(logits, dtype=torch.float32)) * x.shape[1]
    if not adversarial:
        return ce, ce.item(), 0.0
    x_adv = adversarial_search(network, x, config, generator)
    with autocast(x.device):
        adv_logits, _ = network(x_adv)
    zeros = torch.zeros_like(adv_logits, dtype=torch.float32)
    adv = F.binary_cross_entropy_with_logits(adv_logits.float(), zeros) * x.shape[1]
    return ce + config.mu * adv, ce.item(), adv.item()


def learning_rate(config: DROCCConfig, epoch: int) -> float:
    """lr, then lr/10 after 40% and lr/100 after 80% of the adversarial epochs (CE-only epochs at lr)."""
    done = epoch - config.only_ce_epochs
    total = max(config.epochs - config.only_ce_epochs, 1)
    if done <= 0.4 * total:
        return config.lr
    return config.lr * (0.1 if done <= 0.8 * total else 0.01)


def fit_drocc(
    task: Task,
    config: DROCCConfig,
    device: torch.device,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress=None,
) -> tuple[LogitScorer, dict]:
    """Train one DROCC network per task column (per-class batches) and return the CPU scorer and a log."""
    inputs = TrainingInputs.of(task, config.seed)
    generator, class_images, normaliser = inputs.generator, inputs.class_images, inputs.normaliser
    channels, height = inputs.channels, inputs.size
    network = GroupedClassifier(task.n_normal, channels, height, config.rep_dim).to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    log: dict = {"ce_loss": [], "adversarial_loss": []}
    start = 0
    if resume and checkpoint is not None:
        state = load_checkpoint(checkpoint)
        if state["config"] != config.as_dict() or state["classes"] != task.column_names:
            raise UserError(f"checkpoint {checkpoint} was made with other settings; drop --resume or use them")
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        log, start = state["log"], state["epochs_done"]
    device_normaliser = normaliser.to(device)
    steps = math.ceil(max(len(x) for x in class_images) / config.batch_size)
    for epoch in range(start, config.epochs):
        network.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, epoch)
        adversarial = epoch >= config.only_ce_epochs
        ce_total = adv_total = 0.0
        batches = class_batches(class_images, config.batch_size, generator)
        bar = progress(batches, f"drocc {epoch + 1}/{config.epochs}") if progress else batches
        for chosen in bar:
            x = torch.stack(
                [to_float(b.to(device), device_normaliser, config.augment, generator) for b in chosen], dim=1
            )
            loss, ce, adv = drocc_loss(network, x, config, generator, adversarial)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ce_total, adv_total = ce_total + ce, adv_total + adv
        log["ce_loss"].append(ce_total / steps)
        log["adversarial_loss"].append(adv_total / steps)
        if checkpoint is not None:
            save_checkpoint(
                checkpoint,
                {
                    "config": config.as_dict(),
                    "classes": task.column_names,
                    "model": network.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "log": log,
                    "epochs_done": epoch + 1,
                },
            )
    scorer = LogitScorer(network.cpu(), normaliser).eval()
    return scorer, log
