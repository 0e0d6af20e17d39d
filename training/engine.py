"""What every trainer shares: the epoch loop, mixed precision, progress bars, the seeded training tensors,
per-epoch checkpoints with resume, and the images/s timer. DeepMAD, DeepSVDD and DROCC all train
through ``run_epochs`` and save through ``Checkpoint``.
"""

from __future__ import annotations

import ctypes
import io
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from service.fileio import write_atomic
from training.batches import Normaliser
from training.data import Task
from training.errors import UserError

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters

Progress = Callable[[Iterable, str], Iterable]
EpochCallback = Callable[[int, dict[str, float]], None]


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


def progress_bar(enabled: bool) -> Progress | None:
    """A tqdm bar on stderr per epoch (it disappears when the epoch ends), or None for quiet runs."""
    if not enabled:
        return None
    return lambda iterable, desc: tqdm(iterable, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


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
    step_loss: Callable[[Any], tuple[torch.Tensor, dict[str, float]]],
    on_epoch: EpochCallback,
    progress: Progress | None,
    label: str,
    before_epoch: Callable[[int], None] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    """The loop every phase of every method shares: per epoch, train mode, one optimiser step per batch,
    the epoch means of the reported values to ``on_epoch`` (which logs and checkpoints).

    ``batches()`` draws the epoch's order lazily, so the generator's draws keep their order (order
    first, then each batch's augmentation). ``before_epoch`` sets per-epoch state (DROCC's learning
    rate and whether its adversarial term is on); ``scheduler`` steps after every optimiser step.
    """
    if next(module.parameters()).device.type == "cpu":
        retain_freed_memory()
    for epoch in range(start_epoch, epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        module.train()
        totals: dict[str, float] = {}
        steps = 0
        iterable = batches()
        bar = progress(iterable, f"{label} {epoch + 1}/{epochs}") if progress else iterable
        for batch in bar:
            loss, reported = step_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            for key, value in reported.items():
                totals[key] = totals.get(key, 0.0) + value
            steps += 1
            if progress:
                first = next(iter(totals))
                bar.set_postfix(loss=f"{totals[first] / steps:.4f}")
        on_epoch(epoch, {key: total / steps for key, total in totals.items()})


@dataclass(frozen=True)
class RunOptions:
    """Where and how a trainer runs: the device, the checkpoint file (None: no checkpoints), whether to
    resume from it, and progress bars."""

    device: torch.device
    checkpoint: Path | None = None
    resume: bool = False
    progress: bool = False


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
    def of(cls, task: Task, seed: int, contrast: bool = False) -> TrainingInputs:
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
            normaliser=Normaliser.fit(images[labels >= 0], contrast),
            channels=channels,
            size=height,
        )


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


class Checkpoint:
    """A trainer's resumable state, written atomically after every epoch.

    ``identity`` (configuration, columns, training data hash, phase) must match on ``--resume``, so a
    run never continues from a state made with other settings; ``parts`` are the networks and
    optimisers, saved by name; the seeded generator and torch's global generator are saved with them,
    so a resumed run draws what the uninterrupted run would have.

    Example:
        >>> checkpoint = Checkpoint(path, {"config": config.as_dict()}, {"model": model, "optimizer": opt}, gen)
        >>> progress = checkpoint.restore(("epochs_done", "log")) if resume else None
        >>> checkpoint.save(epochs_done=epoch + 1, log=log)
    """

    def __init__(
        self,
        path: Path | None,
        identity: dict[str, Any],
        parts: dict[str, Stateful],
        generator: torch.Generator,
        older_defaults: dict[str, Any] | None = None,
    ):
        self.path = path
        self.identity = identity
        self.parts = parts
        self.generator = generator
        # Identity values assumed where older checkpoints lack the key; for a dict (the configuration),
        # each of its keys: a setting added since a checkpoint was written had its default then.
        self.older_defaults = older_defaults or {}

    def save(self, **progress: Any) -> None:
        if self.path is None:
            return
        state = {
            **self.identity,
            **{name: part.state_dict() for name, part in self.parts.items()},
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            **progress,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomic(self.path, buffer.getvalue())

    def restore(self, progress_keys: tuple[str, ...], optional_keys: tuple[str, ...] = ()) -> dict[str, Any]:
        """Load the state into the parts and generators; returns the progress entries (epochs done, log) and
        those of ``optional_keys`` the checkpoint holds."""
        path = self.path
        if path is None:
            raise UserError("--resume needs a checkpoint path")
        state = {**self.older_defaults, **read_checkpoint(path)}
        for key, default in self.older_defaults.items():
            if isinstance(default, dict) and isinstance(state[key], dict):
                state[key] = {**default, **state[key]}
        required = [*self.identity, *self.parts, "generator", "torch_rng", *progress_keys]
        # Other settings first: a setting can also change the parts saved (the epoch choice's record).
        if any(key in state and state[key] != value for key, value in self.identity.items()):
            raise UserError(f"checkpoint {path} was made with other settings; drop --resume or use them")
        missing = [key for key in required if key not in state]
        if missing:
            raise UserError(f"checkpoint {path} is not one of this method's checkpoints (it lacks {missing})")
        try:
            for name, part in self.parts.items():
                part.load_state_dict(state[name])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise UserError(f"checkpoint {path} does not fit this network ({str(exc).splitlines()[0]})") from None
        return {key: state[key] for key in (*progress_keys, *optional_keys) if key in state}


class BestEpochs:
    """Held-out scores per epoch and, under each criterion, the best epoch's weights of ``module``, so a
    trainer can export that epoch instead of the last one. Saved with a ``Checkpoint``'s progress (its
    ``state_dict``), so a finished run can be re-exported under another criterion.

    ``criteria`` maps a criterion's name to (the record's field it reads, whether higher is better); a
    record without that field (None) does not compete under it.
    """

    def __init__(self, module: torch.nn.Module, criteria: dict[str, tuple[str, bool]]):
        self.module = module
        self.criteria = criteria
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, dict[str, Any]] = {}

    def observe(self, epoch: int, record: dict[str, Any]) -> None:
        """Record epoch ``epoch`` (0-based) and keep the module's weights where it is the best so far."""
        self.history.append({"epoch": epoch + 1, **record})
        for criterion, (key, maximise) in self.criteria.items():
            value, held = record.get(key), self.best.get(criterion)
            if value is not None and (held is None or (value > held["value"] if maximise else value < held["value"])):
                weights = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
                self.best[criterion] = {"epoch": epoch + 1, "value": value, "weights": weights}

    def load_best(self, criterion: str) -> dict[str, Any]:
        """Put the best epoch's weights under ``criterion`` into the module; returns its epoch and value."""
        if criterion not in self.best:
            raise UserError(f"no epoch was scored under the epoch choice {criterion}")
        chosen = self.best[criterion]
        self.module.load_state_dict(chosen["weights"])
        return {"epoch": chosen["epoch"], "value": chosen["value"]}

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.best = list(state["history"]), dict(state["best"])


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's dict, or a one-line UserError for a missing, torn or foreign file."""
    if not path.exists():
        raise UserError(f"--resume given but no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a torn or foreign file: tell the user which
        raise UserError(f"checkpoint {path} cannot be read ({exc}); delete it to start afresh") from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__}, not a training checkpoint")
    return state


class Timer:
    """Wall time of a phase; images/s counts one image once per encoder that processed it."""

    def __init__(self, device: torch.device):
        self._device = device
        self._start = time.perf_counter()

    def rate(self, images: int) -> float:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        elapsed = time.perf_counter() - self._start
        return images / elapsed if elapsed > 0 and images > 0 else 0.0
