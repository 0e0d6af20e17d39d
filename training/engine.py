"""Runs the two DeepMAD phases for a task, checkpointing after every epoch, and returns a Scorer."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from training.batches import Normaliser
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import Task
from training.errors import UserError
from training.methods.deepmad import DeepMADConfig, compute_centres, pretrain_autoencoders, train_encoders
from training.networks import GroupedAutoencoder
from training.scorer import Scorer


@dataclass
class TrainingLog:
    autoencoder_mse: list[float] = field(default_factory=list)
    encoder_loss: list[float] = field(default_factory=list)
    images_per_second: dict[str, float] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but CUDA is not available on this machine")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name!r} is not a valid device") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    raise UserError(f"--device must be auto, cpu or cuda[:N], not {name!r}")


def _progress(enabled: bool):
    if not enabled:
        return None
    return lambda iterable, desc: tqdm(iterable, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


@dataclass
class TrainingInputs:
    """What every trainer starts from: the seeded generator, the training tensors split by class, and the
    normalisation fitted on normal images only (outlier-exposure photos, label -1, never set it)."""

    generator: torch.Generator
    images: torch.Tensor
    labels: torch.Tensor
    class_images: list[torch.Tensor]
    normaliser: Normaliser
    channels: int
    size: int

    @classmethod
    def of(cls, task: Task, seed: int) -> TrainingInputs:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        images = torch.from_numpy(task.train.images)
        labels = torch.from_numpy(task.train.labels)
        height, width, channels = images.shape[1:]
        if height != width:
            raise UserError(f"square inputs only, got {height}x{width}")
        return cls(
            generator=generator,
            images=images,
            labels=labels,
            class_images=[images[labels == i] for i in range(task.n_normal)],
            normaliser=Normaliser.fit(images[labels >= 0]),
            channels=channels,
            size=height,
        )


def fit_deepmad(
    task: Task,
    config: DeepMADConfig,
    device: torch.device,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    encoder_phase: Callable = train_encoders,
) -> tuple[Scorer, TrainingLog]:
    """Train the m encoders of ``task`` together and return the eval-mode scorer on the CPU.

    ``encoder_phase`` is phase 2: DeepMAD's contrastive ``train_encoders`` by default, or
    ``deepsvdd.train_one_class_encoders`` for m independent one-class detectors (DeepSVDD(m)).
    """
    inputs = TrainingInputs.of(task, config.seed)
    generator, train_images, train_labels = inputs.generator, inputs.images, inputs.labels
    class_images, normaliser, channels, height = inputs.class_images, inputs.normaliser, inputs.channels, inputs.size
    model = GroupedAutoencoder(task.n_normal, channels, height, config.rep_dim).to(device)
    ae_optimizer = torch.optim.Adam(model.parameters(), lr=config.ae_lr, weight_decay=config.weight_decay)
    enc_optimizer = torch.optim.Adam(model.encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    log = TrainingLog()
    centres: torch.Tensor | None = None
    ae_start = enc_start = 0

    data_sha256 = task.content_sha256()  # outlier exposure or another subsample changes the data, not the config
    if resume and checkpoint is not None:
        state = load_checkpoint(checkpoint)
        phase = state.get("encoder_phase", train_encoders.__name__)
        same = (
            state["config"] == config.as_dict()
            and state["classes"] == task.column_names
            and state.get("training_data", data_sha256) == data_sha256
        )
        if not same or phase != encoder_phase.__name__:
            raise UserError(f"checkpoint {checkpoint} was made with other settings; drop --resume or use them")
        model.load_state_dict(state["model"])
        ae_optimizer.load_state_dict(state["ae_optimizer"])
        enc_optimizer.load_state_dict(state["enc_optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        centres = state["centres"]
        log = TrainingLog(**state["log"])
        ae_start, enc_start = state["ae_epochs_done"], state["enc_epochs_done"]

    def save(ae_done: int, enc_done: int) -> None:
        if checkpoint is None:
            return
        save_checkpoint(
            checkpoint,
            {
                "config": config.as_dict(),
                "classes": task.column_names,
                "training_data": data_sha256,
                "encoder_phase": encoder_phase.__name__,
                "model": model.state_dict(),
                "ae_optimizer": ae_optimizer.state_dict(),
                "enc_optimizer": enc_optimizer.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "centres": centres,
                "log": log.__dict__,
                "ae_epochs_done": ae_done,
                "enc_epochs_done": enc_done,
            },
        )

    def after_ae_epoch(epoch: int, mse: float) -> None:
        log.autoencoder_mse.append(mse)
        save(epoch + 1, 0)

    def after_enc_epoch(epoch: int, loss: float) -> None:
        log.encoder_loss.append(loss)
        # The rate so far goes into every checkpoint, so a re-export of a finished run still reports it.
        images = (epoch + 1 - enc_start) * len(train_images) * task.n_normal
        log.images_per_second["encoders"] = timer.rate(images)
        save(config.ae_epochs, epoch + 1)

    bar = _progress(progress)
    device_normaliser = normaliser.to(device)
    timer = _Timer(device)
    pretrain_autoencoders(
        model, class_images, device_normaliser, config, ae_optimizer, generator, ae_start, after_ae_epoch, bar
    )
    seen = (
        (config.ae_epochs - ae_start)
        * task.n_normal
        * config.batch_size
        * -(-max(len(x) for x in class_images) // config.batch_size)
    )
    if seen:  # a run resumed after this phase keeps the rate it measured
        log.images_per_second["autoencoders"] = timer.rate(seen)
    if centres is None:
        centres = compute_centres(model.encoder, class_images, device_normaliser).cpu()
        save(config.ae_epochs, 0)
    timer = _Timer(device)
    encoder_phase(
        model.encoder,
        centres,
        train_images,
        train_labels,
        device_normaliser,
        config,
        enc_optimizer,
        generator,
        enc_start,
        after_enc_epoch,
        bar,
    )
    scorer = Scorer(model.encoder.cpu(), centres, normaliser).eval()
    return scorer, log


class _Timer:
    """Wall time of a phase; images/s counts one image once per encoder that processed it."""

    def __init__(self, device: torch.device):
        self._device = device
        self._start = time.perf_counter()

    def rate(self, images: int) -> float:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        elapsed = time.perf_counter() - self._start
        return images / elapsed if elapsed > 0 and images > 0 else 0.0
