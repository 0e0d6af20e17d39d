"""DROCC (Goyal et al. 2020) for one or m normal classes: a classifier with adversarially searched negatives.

Written from the DROCC paper and the behaviour of its published trainer (EdgeML's DROCCTrainer):

- normal training items have label 1; the loss is BCE(logit(x), 1) + mu * BCE(logit(x_adv), 0);
- x_adv starts at x + N(0, I) and takes ``ascent_steps`` steps of size ``ascent_step_size`` along the
  per-item normalised gradient that *raises* BCE(logit, 0), i.e. towards points the network calls
  normal; every 10 steps, and after the last one (so short searches are projected too), h = x_adv - x
  is projected onto r <= ||h|| <= radius_factor * r (the paper's and EdgeML's gamma);
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

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

from service.manifest import TrainingLog
from training.batches import class_batches, to_float
from training.data import Task
from training.engine import Checkpoint, RunOptions, TrainingInputs, autocast, progress_bar, run_epochs
from training.methods.config import MethodConfig, setting
from training.networks import GroupedClassifier
from training.scorer import LogitScorer

PROJECT_EVERY = 10


@dataclass
class DROCCConfig(MethodConfig):
    """Paper table 18 (r 8, mu 1, Adam 1e-3, ascent step 1e-3) and EdgeML's CIFAR command (gamma 1, batch 256)."""

    LABEL = "DROCC"
    SWEEP_FLAGS = {"epochs": "drocc_epochs"}

    rep_dim: int = setting(128, "feature dimension of each encoder", minimum=1)
    radius: float = setting(8.0, "r of N(r): negatives lie at least r from a training item", above=0)
    radius_factor: float = setting(
        1.0, "negatives lie at most radius_factor * r away (the paper's gamma)", minimum=1, aliases=("--gamma",)
    )
    mu: float = setting(1.0, "weight of the adversarial loss", minimum=0)
    lr: float = setting(1e-3, "Adam learning rate", above=0)
    ascent_step_size: float = setting(1e-3, "step of the adversarial search", above=0)
    ascent_steps: int = setting(50, "gradient ascent steps of the adversarial search", minimum=0)
    only_ce_epochs: int = setting(0, "BCE-only epochs before the adversarial term", minimum=0)
    batch_size: int = setting(256, "batch size", minimum=1)
    epochs: int = setting(40, "training epochs", minimum=0)
    weight_decay: float = setting(0.0, "lambda (Adam's weight decay)", minimum=0)
    augment: bool = setting(False, "flips, +-4 px shifts, brightness jitter in training (not in the paper)")
    seed: int = setting(0, "initialisation, batch order and augmentation seed", minimum=0)


def project(x: torch.Tensor, x_adv: torch.Tensor, radius: float, radius_factor: float) -> torch.Tensor:
    """Move each x_adv so that r <= ||x_adv - x|| <= radius_factor * r (norms over all but the first two dims)."""
    h = x_adv - x
    dims = tuple(range(2, h.dim()))
    norm = h.pow(2).sum(dims, keepdim=True).sqrt().clamp_min(1e-12)
    return x + h * (norm.clamp(radius, radius_factor * radius) / norm)


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
                x_adv = project(x, x_adv, config.radius, config.radius_factor)
    if config.ascent_steps == 0:
        x_adv = project(x, x_adv, config.radius, config.radius_factor)
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


def fit_drocc(task: Task, config: DROCCConfig, run: RunOptions) -> tuple[LogitScorer, TrainingLog]:
    """Train one DROCC network per task column (per-class batches) and return the CPU scorer and a log."""
    inputs, device = TrainingInputs.of(task, config.seed), run.device
    generator = inputs.generator
    network = GroupedClassifier(task.n_normal, inputs.channels, inputs.size, config.rep_dim).to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    data_sha256 = task.content_sha256()
    state = Checkpoint(
        run.checkpoint,
        identity={"config": config.as_dict(), "classes": task.column_names, "training_data": data_sha256},
        parts={"model": network, "optimizer": optimizer},
        generator=generator,
        older_defaults={"training_data": data_sha256},
    )
    log, start = TrainingLog(), 0
    if run.resume:
        restored = state.restore(("log", "epochs_done"))
        log, start = TrainingLog.model_validate(restored["log"]), restored["epochs_done"]
    normaliser = inputs.normaliser.to(device)
    adversarial = False

    def before_epoch(epoch: int) -> None:
        nonlocal adversarial
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, epoch)
        adversarial = epoch >= config.only_ce_epochs

    def step_loss(chosen: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        x = torch.stack([to_float(b.to(device), normaliser, config.augment, generator) for b in chosen], dim=1)
        loss, ce, adv = drocc_loss(network, x, config, generator, adversarial)
        return loss, {"ce_loss": ce, "adversarial_loss": adv}

    def after_epoch(epoch: int, means: dict[str, float]) -> None:
        log.append(means)
        state.save(log=log.model_dump(), epochs_done=epoch + 1)

    run_epochs(
        network,
        optimizer,
        config.epochs,
        start,
        lambda: class_batches(inputs.class_images, config.batch_size, generator),
        step_loss,
        after_epoch,
        progress_bar(run.progress),
        "drocc",
        before_epoch,
    )
    return LogitScorer(network.cpu(), inputs.normaliser).eval(), log
