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

import torch

from service.manifest import TrainingLog
from training.batches import class_batches
from training.data import Task
from training.engine import RunOptions, autocast
from training.methods.deepmad import DeepMADConfig, EncoderPhase, fit_deepmad
from training.scorer import Scorer


def one_class_loss(embeddings: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Sum over detectors of the batch mean of ||E_i(x) - c_i||^2; embeddings [B, m, D], centres [m, D]."""
    return (embeddings - centres.unsqueeze(0)).pow(2).sum(-1).mean(0).sum()


def train_one_class_encoders(phase: EncoderPhase) -> None:
    """Phase 2 for DeepSVDD(m): encoder i pulls class i onto c_i and sees nothing else."""
    centres = phase.device_centres()
    class_images = [phase.images[phase.labels == i] for i in range(phase.encoder.groups)]

    def step_loss(chosen: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        x = torch.stack([phase.to_input(b) for b in chosen], dim=1)
        with autocast(phase.device):
            z = phase.encoder(x)  # [B, m, D]: group i saw class i
        loss = one_class_loss(z.float(), centres)
        return loss, {"encoder_loss": loss.item()}

    phase.run(lambda: class_batches(class_images, phase.config.batch_size, phase.generator), step_loss, "one-class")


def fit_deepsvdd(task: Task, config: DeepMADConfig, run: RunOptions) -> tuple[Scorer, TrainingLog]:
    """DeepMAD's autoencoder pretraining and centres, then the one-class phase 2 (pooled or per class)."""
    return fit_deepmad(task, config, run, encoder_phase=train_one_class_encoders)
