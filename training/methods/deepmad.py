"""DeepMAD (paper Algorithm 3): autoencoder pretraining per class, centres, then the contrastive loss.

L(theta_i) = 1/N sum_{x in X_i} ||E_i(x) - c_i||^2
           + eta/N sum_{x in X_j, j != i} max(0, delta - ||E_i(x) - c_i||)^2 + lambda/2 sum ||W||^2

Every encoder sees every normal training image in phase 2 (its own class as positives, the others as
negatives), so the m encoders share each batch and train as one grouped network. lambda is Adam's
weight decay (it adds lambda * W to the gradient, the derivative of lambda/2 ||W||^2).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from training.batches import Normaliser, class_batches, to_float
from training.networks import GroupedAutoencoder, GroupedEncoder

CENTRE_EPS = 0.1  # DeepSVDD: a centre component near 0 is pushed to +-eps (a zero unit is trivially matched)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


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


def retain_freed_memory() -> None:
    """Let glibc keep freed blocks for the next step instead of returning them to the OS.

    By default a block over 32 MB is mmap-ed and unmapped when freed, and the heap top is trimmed, so
    every step faults its activations back in as fresh zeroed pages. The grouped network's activations
    are m times one encoder's: on the CPU that was ~110k page faults and 0.2-0.3 s of a 1.3 s step.
    A training step allocates the same sizes every time, so keeping them costs only the peak reached.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return  # not glibc: its allocator has its own policy
    mallopt(M_MMAP_THRESHOLD, 1 << 30)
    mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)


def run_epochs(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    start_epoch: int,
    batches: Callable[[], Iterable],
    step_loss: Callable[[object], tuple[torch.Tensor, float]],
    on_epoch: EpochCallback,
    progress: Callable | None,
    label: str,
) -> None:
    """The loop every phase shares: per epoch, train mode, one optimiser step per batch, the mean of the
    reported values to ``on_epoch`` (which checkpoints). ``batches()`` draws the epoch's order lazily, so
    the generator's draws keep their order (order first, then each batch's augmentation)."""
    if next(module.parameters()).device.type == "cpu":
        retain_freed_memory()
    for epoch in range(start_epoch, epochs):
        module.train()
        total, steps = 0.0, 0
        iterable = batches()
        bar = progress(iterable, f"{label} {epoch + 1}/{epochs}") if progress else iterable
        for batch in bar:
            loss, reported = step_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += reported
            steps += 1
            if progress:
                bar.set_postfix(loss=f"{total / steps:.4f}")
        on_epoch(epoch, total / steps)


def shuffled_batches(count: int, batch_size: int, generator: torch.Generator):
    """Index batches of one seeded permutation of ``count`` items (drawn when iteration starts)."""
    order = torch.randperm(count, generator=generator)
    for start in range(0, count, batch_size):
        yield order[start : start + batch_size]


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

    def step_loss(chosen: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        batch = torch.stack(
            [to_float(x.to(device), normaliser, config.augment, generator) for x in chosen], dim=1
        )  # [B, m, C, H, W]
        with autocast(device):
            reconstruction = autoencoder(batch)
        # Mean squared error per autoencoder, summed over the m independent autoencoders.
        loss = (reconstruction.float() - batch).pow(2).mean(dim=(0, 2, 3, 4)).sum()
        return loss, loss.item() / len(chosen)

    run_epochs(
        autoencoder,
        optimizer,
        config.ae_epochs,
        start_epoch,
        lambda: class_batches(class_images, config.batch_size, generator),
        step_loss,
        on_epoch,
        progress,
        "autoencoders",
    )


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

    def step_loss(chosen: torch.Tensor) -> tuple[torch.Tensor, float]:
        x = to_float(images[chosen].to(device), normaliser, config.augment, generator)
        with autocast(device):
            z = encoder.embed_shared(x)
        loss, _ = deepmad_loss(z.float(), centres, labels[chosen].to(device), config.eta, config.delta)
        return loss, loss.item()

    run_epochs(
        encoder,
        optimizer,
        config.epochs,
        start_epoch,
        lambda: shuffled_batches(len(images), config.batch_size, generator),
        step_loss,
        on_epoch,
        progress,
        "encoders",
    )
