"""Self-supervised pretraining by rotation prediction, in place of DeepMAD's autoencoder phase.

Encoder i sees its own class's training photos turned by 0, 90, 180 or 270 degrees and a small linear
head guesses which (Gidaris et al., 2018; used for one-class detection by Golan & El-Yaniv, 2018 and
Hendrycks et al., 2019). To tell the turns apart the encoder has to encode the item's shape and how it
sits in the photo, not the pixel detail an autoencoder reconstructs, which is the detail it can
memorise. DeepMAD's centres and contrastive phase then start from these weights; the head is dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from training.engine import autocast
from training.methods.pretraining import PhaseOne
from training.networks import GroupedEncoder

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


def pretrain_rotation(encoder: GroupedEncoder, head: RotationHead, phase: PhaseOne) -> None:
    """Phase 1 by rotation prediction: group i gets a batch of class i in four turns; cross-entropy summed
    over the m encoders. Batches, epochs and augmentation are the autoencoder phase's; ``on_epoch`` gets
    ``{"rotation_loss": ...}`` (the mean over encoders, as the autoencoders' MSE)."""
    device = next(encoder.parameters()).device

    def step_loss(chosen: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        views, labels = turned(phase.batch(chosen, device, phase.config.augmentation))
        with autocast(device):
            logits = head(encoder(views)).float()  # [4B, m, TURNS]
        per_encoder = nn.functional.cross_entropy(
            logits.permute(0, 2, 1), labels.unsqueeze(1).expand(-1, logits.shape[1]), reduction="none"
        ).mean(0)
        loss = per_encoder.sum()
        return loss, {"rotation_loss": loss.item() / len(chosen)}

    phase.run(nn.ModuleList([encoder, head]), step_loss, "rotation")
