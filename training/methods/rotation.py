"""Self-supervised pretraining by rotation prediction, in place of DeepMAD's autoencoder phase.

Encoder i sees its own class's training photos turned by 0, 90, 180 or 270 degrees and a small linear
head guesses which (Gidaris et al., 2018; used for one-class detection by Golan & El-Yaniv, 2018 and
Hendrycks et al., 2019). To tell the turns apart the encoder has to encode the item's shape and how it
sits in the photo, not the pixel detail an autoencoder reconstructs, which is the detail it can
memorise. DeepMAD's centres and contrastive phase then start from these weights; the head is dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from training.batches import Normaliser, class_batches, to_float
from training.engine import EpochCallback, Progress, autocast, run_epochs
from training.networks import GroupedEncoder

if TYPE_CHECKING:
    from training.methods.deepmad import DeepMADConfig  # which imports this module for its phase 1

TURNS = 4  # 0, 90, 180, 270 degrees


class RotationHead(nn.Module):
    """One linear layer per encoder: [B, m, rep_dim] -> logits [B, m, TURNS]."""

    def __init__(self, groups: int, rep_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(groups, rep_dim, TURNS) / rep_dim**0.5)
        self.bias = nn.Parameter(torch.zeros(groups, TURNS))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bgd,gdt->bgt", embeddings, self.weight) + self.bias


def turned(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image [B, m, C, H, W] in all four turns -> ([4B, m, C, H, W], turn labels [4B])."""
    views = [torch.rot90(x, k, dims=(3, 4)) for k in range(TURNS)]
    labels = torch.arange(TURNS, device=x.device).repeat_interleave(x.shape[0])
    return torch.cat(views), labels


def pretrain_rotation(
    encoder: GroupedEncoder,
    head: RotationHead,
    class_images: list[torch.Tensor],
    normaliser: Normaliser,
    config: DeepMADConfig,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    start_epoch: int,
    on_epoch: EpochCallback,
    progress: Progress | None = None,
) -> None:
    """Phase 1 by rotation prediction: group i gets a batch of class i in four turns; cross-entropy summed
    over the m encoders. Batches, epochs and augmentation are the autoencoder phase's; ``on_epoch`` gets
    ``{"rotation_loss": ...}`` (the mean over encoders, as the autoencoders' MSE)."""
    device = next(encoder.parameters()).device
    module = nn.ModuleList([encoder, head])

    def step_loss(chosen: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = torch.stack(
            [to_float(x.to(device), normaliser, config.augmentation, generator) for x in chosen], dim=1
        )  # [B, m, C, H, W]
        views, labels = turned(batch)
        with autocast(device):
            logits = head(encoder(views)).float()  # [4B, m, TURNS]
        per_encoder = nn.functional.cross_entropy(
            logits.permute(0, 2, 1), labels.unsqueeze(1).expand(-1, logits.shape[1]), reduction="none"
        ).mean(0)
        loss = per_encoder.sum()
        return loss, {"rotation_loss": loss.item() / len(chosen)}

    run_epochs(
        module,
        optimizer,
        config.ae_epochs,
        start_epoch,
        lambda: class_batches(class_images, config.batch_size, generator),
        step_loss,
        on_epoch,
        progress,
        "rotation",
    )
