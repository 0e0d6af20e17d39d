"""Phase 1's shared inputs: the per-class training photos, trained in batches of one class per encoder.

A phase-1 trainer (``deepmad.pretrain_autoencoders``, ``rotation.pretrain_rotation``,
``contrastive.pretrain_contrastive``) gets one ``PhaseOne``, builds its step loss from ``batch`` and
calls ``run``. An epoch is ceil(max_i |X_i| / batch) steps; smaller classes wrap around within the
epoch, so every image of every class is seen at least once per epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from training.batches import Normaliser, class_batches, to_float
from training.engine import EpochCallback, Progress, run_epochs
from training.methods.config import DeepMADConfig


def ignore_epoch(epoch: int, means: dict[str, float]) -> None:
    """The default ``on_epoch``: no log, no checkpoint."""


@dataclass
class PhaseOne:
    class_images: list[torch.Tensor]  # uint8 [N_i, H, W, C] per class
    normaliser: Normaliser  # on the models' device
    config: DeepMADConfig  # epochs (ae_epochs), batch size and augmentation
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    start_epoch: int = 0
    on_epoch: EpochCallback = ignore_epoch
    progress: Progress | None = None

    def batch(self, chosen: list[torch.Tensor], device: torch.device, augmentation: bool | str) -> torch.Tensor:
        """One uint8 batch per class -> the float input [B, m, C, H, W] on ``device``, group i from class i."""
        return torch.stack(
            [to_float(x.to(device), self.normaliser, augmentation, self.generator) for x in chosen], dim=1
        )

    def run(self, module: nn.Module, step_loss: Callable[[list[torch.Tensor]], tuple], label: str) -> None:
        config = self.config
        run_epochs(
            module,
            self.optimizer,
            config.ae_epochs,
            self.start_epoch,
            lambda: class_batches(self.class_images, config.batch_size, self.generator),
            step_loss,
            self.on_epoch,
            self.progress,
            label,
        )
