"""DeepSVDD's one-class objective for m independent detectors at once (Algorithm 1's DeepSVDD(m)).

Encoder i is trained on class i only: min 1/|X_i| sum_{x in X_i} ||E_i(x) - c_i||^2 (+ Adam's weight
decay). Each step gives group i of the grouped network a batch of class i, exactly as autoencoder
pretraining does, so BatchNorm statistics of encoder i never see another class: the m detectors are
the m separate one-class models of Algorithm 1, trained in one forward/backward pass.

The pooled DeepSVDD of Algorithm 2 is this with m = 1 on the pooled task (and equals DeepMAD's phase 2
there, since one class has no negatives). Table 19's epsilon (0.01) has no role here: in Deep SAD's
code it only enters the loss of labelled anomalies, which this setting has none of; the centre guard
keeps DeepSVDD's 0.1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from training.batches import Normaliser, class_batches, to_float
from training.methods.deepmad import DeepMADConfig, EpochCallback, autocast, run_epochs
from training.networks import GroupedEncoder


def one_class_loss(embeddings: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Sum over detectors of the batch mean of ||E_i(x) - c_i||^2; embeddings [B, m, D], centres [m, D]."""
    return (embeddings - centres.unsqueeze(0)).pow(2).sum(-1).mean(0).sum()


def train_one_class_encoders(
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
    """Phase 2 for DeepSVDD(m): encoder i pulls class i onto c_i and sees nothing else.

    Same signature as ``deepmad.train_encoders`` so ``fit_deepmad`` runs either.
    """
    device = next(encoder.parameters()).device
    centres = centres.to(device)
    class_images = [images[labels == i] for i in range(encoder.groups)]

    def step_loss(chosen: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        x = torch.stack([to_float(b.to(device), normaliser, config.augment, generator) for b in chosen], dim=1)
        with autocast(device):
            z = encoder(x)  # [B, m, D]: group i saw class i
        loss = one_class_loss(z.float(), centres)
        return loss, loss.item()

    run_epochs(
        encoder,
        optimizer,
        config.epochs,
        start_epoch,
        lambda: class_batches(class_images, config.batch_size, generator),
        step_loss,
        on_epoch,
        progress,
        "one-class",
    )
