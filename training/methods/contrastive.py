"""Self-supervised pretraining by two-view contrast (SimCLR's NT-Xent), in place of DeepMAD's autoencoders.

Encoder i sees two strongly augmented views of each photo of its own class in a batch; a small
projection head maps both, and the loss asks each view to pick its twin out of the batch (Chen et al.,
2020; for one-class detection, Tack et al., 2020 and Sohn et al., 2021). To do that the encoder has to
keep what survives crops, turns, jitter and cutout — the item — and drop what does not, such as the
exact pixels an autoencoder reconstructs and can memorise. The views are always the strong
augmentation (two identical views would teach nothing); DeepMAD's centres and contrastive phase then
start from these weights, and the head is dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from training.engine import autocast
from training.methods.pretraining import PhaseOne
from training.networks import GroupedEncoder

PROJECTION_DIM = 64
TEMPERATURE = 0.5  # SimCLR's value for CIFAR-10-sized images


class ProjectionHead(nn.Module):
    """A two-layer MLP per encoder: [B, m, rep_dim] -> [B, m, PROJECTION_DIM]."""

    def __init__(self, groups: int, rep_dim: int):
        super().__init__()
        self.hidden = nn.Parameter(torch.randn(groups, rep_dim, rep_dim) / rep_dim**0.5)
        self.out = nn.Parameter(torch.randn(groups, rep_dim, PROJECTION_DIM) / rep_dim**0.5)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(torch.einsum("bgd,gde->bge", embeddings, self.hidden))
        return torch.einsum("bge,gep->bgp", hidden, self.out)


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Per-encoder NT-Xent of two views [B, m, P] -> [m]: each of the 2B views against the other 2B - 1,
    its twin as the right answer."""
    views = F.normalize(torch.cat([first, second]), dim=-1).permute(1, 0, 2)  # [m, 2B, P]
    n = views.shape[1]
    similarity = views @ views.transpose(1, 2) / temperature  # [m, 2B, 2B]
    own = torch.eye(n, dtype=torch.bool, device=views.device)
    similarity = similarity.masked_fill(own, float("-inf"))
    twins = (torch.arange(n, device=views.device) + n // 2) % n
    return torch.stack([F.cross_entropy(group, twins) for group in similarity])


def pretrain_contrastive(encoder: GroupedEncoder, head: ProjectionHead, phase: PhaseOne) -> None:
    """Phase 1 by two-view contrast: group i gets two views of a batch of class i; NT-Xent summed over the
    m encoders. Batches and epochs are the autoencoder phase's; ``on_epoch`` gets ``{"contrastive_loss":
    ...}`` (the mean over encoders)."""
    device = next(encoder.parameters()).device

    def step_loss(chosen: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        first, second = phase.batch(chosen, device, "strong"), phase.batch(chosen, device, "strong")
        with autocast(device):
            projected = head(encoder(torch.cat([first, second]))).float()
        per_encoder = nt_xent(*projected.chunk(2))
        loss = per_encoder.sum()
        return loss, {"contrastive_loss": loss.item() / len(chosen)}

    phase.run(nn.ModuleList([encoder, head]), step_loss, "contrastive")
