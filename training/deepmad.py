"""DeepMAD (paper Algorithm 3): autoencoder pretraining per class, centres, then the contrastive loss.

L(theta_i) = 1/N sum_{x in X_i} ||E_i(x) - c_i||^2
           + eta/N sum_{x in X_j, j != i} max(0, delta - ||E_i(x) - c_i||)^2 + lambda/2 sum ||W||^2

Every encoder sees every normal training image in phase 2 (its own class as positives, the others as
negatives), so the m encoders share each batch and train as one grouped network. lambda is Adam's
weight decay (it adds lambda * W to the gradient, the derivative of lambda/2 ||W||^2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from training.batches import Normaliser, class_batches, to_float
from training.networks import GroupedAutoencoder, GroupedEncoder

CENTRE_EPS = 0.1  # DeepSVDD: a centre component near 0 is pushed to +-eps (a zero unit is trivially matched)


@dataclass
class DeepMADConfig:
    rep_dim: int = 128
    eta: float = 1.0
    delta: float = 8.2
    lr: float = 1e-4
    weight_decay: float = 1e-6
    batch_size: int = 128
    ae_epochs: int = 20
    ae_lr: float = 1e-4
    epochs: int = 30
    augment: bool = False
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def deepmad_loss(
    embeddings: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, eta: float, delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch estimate of the sum over encoders of L(theta_i), without the weight-decay term.

    embeddings [B, m, D]; centres [m, D]; labels [B] in 0..m-1 (or -1: negative for every encoder).
    Returns (total, per-encoder [m]). Dividing by the batch size is the batch estimate of 1/N.
    """
    squared = (embeddings - centres.unsqueeze(0)).pow(2).sum(-1)  # [B, m]
    positive = labels.unsqueeze(1) == torch.arange(centres.shape[0], device=labels.device).unsqueeze(0)
    distance = torch.sqrt(squared + 1e-12)
    pull = torch.where(positive, squared, torch.zeros_like(squared))
    push = torch.where(positive, torch.zeros_like(squared), torch.relu(delta - distance).pow(2))
    per_encoder = (pull + eta * push).mean(0)
    return per_encoder.sum(), per_encoder


def guard_centres(centres: torch.Tensor, eps: float = CENTRE_EPS) -> torch.Tensor:
    near_zero = centres.abs() < eps
    return torch.where(
        near_zero & (centres < 0),
        torch.full_like(centres, -eps),
        torch.where(near_zero, torch.full_like(centres, eps), centres),
    )


@torch.no_grad()
def compute_centres(
    encoder: GroupedEncoder, class_images: list[torch.Tensor], normaliser: Normaliser, batch_size: int = 512
) -> torch.Tensor:
    """c_i = mean of E_i(X_i) (eval mode), guarded against near-zero components. Returns [m, D]."""
    encoder.eval()
    device = next(encoder.parameters()).device
    centres = []
    for group, images in enumerate(class_images):
        total = torch.zeros(encoder.rep_dim, device=device, dtype=torch.float64)
        for start in range(0, len(images), batch_size):
            x = to_float(images[start : start + batch_size].to(device), normaliser)
            total += encoder.embed_shared(x)[:, group].double().sum(0)
        centres.append(total / len(images))
    return guard_centres(torch.stack(centres).float())


@torch.no_grad()
def embed(encoder: GroupedEncoder, images: torch.Tensor, normaliser: Normaliser, batch_size: int = 512) -> torch.Tensor:
    """Eval-mode embeddings [N, m, D] of uint8 NHWC images."""
    encoder.eval()
    device = next(encoder.parameters()).device
    out = [
        encoder.embed_shared(to_float(images[s : s + batch_size].to(device), normaliser)).float().cpu()
        for s in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


EpochCallback = Callable[[int, float], None]


def autocast(device: torch.device):
    """bf16 mixed precision on CUDA; full precision on the CPU (where it is deterministic)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def pretrain_autoencoders(
    autoencoder: GroupedAutoencoder,
    class_images: list[torch.Tensor],
    normaliser: Normaliser,
    config: DeepMADConfig,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    start_epoch: int,
    on_epoch: EpochCallback,
    progress: Callable | None = None,
) -> None:
    """Phase 1: autoencoder A_i on X_i only, MSE. Each step gives group i a batch of class i.

    An epoch is ceil(max_i |X_i| / batch) steps; smaller classes wrap around within the epoch, so every
    image of every class is seen at least once per epoch.
    """
    device = next(autoencoder.parameters()).device
    groups = len(class_images)
    steps = math.ceil(max(len(x) for x in class_images) / config.batch_size)
    for epoch in range(start_epoch, config.ae_epochs):
        autoencoder.train()
        total = 0.0
        batches = class_batches(class_images, config.batch_size, generator)
        bar = progress(batches, f"autoencoders {epoch + 1}/{config.ae_epochs}") if progress else batches
        for step, chosen in enumerate(bar):
            batch = torch.stack(
                [to_float(x.to(device), normaliser, config.augment, generator) for x in chosen], dim=1
            )  # [B, m, C, H, W]
            with autocast(device):
                reconstruction = autoencoder(batch)
            # Mean squared error per autoencoder, summed over the m independent autoencoders.
            loss = (reconstruction.float() - batch).pow(2).mean(dim=(0, 2, 3, 4)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() / groups
            if progress:
                bar.set_postfix(mse=f"{total / (step + 1):.4f}")
        on_epoch(epoch, total / steps)


def train_encoders(
    encoder: GroupedEncoder,
    centres: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    normaliser: Normaliser,
    config: DeepMADConfig,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    start_epoch: int,
    on_epoch: EpochCallback,
    progress: Callable | None = None,
) -> None:
    """Phase 2: every encoder on every normal image with the contrastive loss (labels: class column)."""
    device = next(encoder.parameters()).device
    centres = centres.to(device)
    steps = math.ceil(len(images) / config.batch_size)
    for epoch in range(start_epoch, config.epochs):
        encoder.train()
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        bar = progress(range(steps), f"encoders {epoch + 1}/{config.epochs}") if progress else range(steps)
        for step in bar:
            chosen = order[step * config.batch_size : (step + 1) * config.batch_size]
            x = to_float(images[chosen].to(device), normaliser, config.augment, generator)
            with autocast(device):
                z = encoder.embed_shared(x)
            loss, _ = deepmad_loss(z.float(), centres, labels[chosen].to(device), config.eta, config.delta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            if progress:
                bar.set_postfix(loss=f"{total / (step + 1):.4f}")
        on_epoch(epoch, total / steps)
