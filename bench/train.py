"""Training benchmark: the m DeepMAD encoders trained together (one grouped network) vs one after another.

    .venv/bin/python -m bench.train             # 2 autoencoder + 3 encoder epochs, 200 images per class
    .venv/bin/python -m bench.train --quick     # 1 + 1 epochs on 50 images per class

Same data (TrashNet 5/1: the five recyclables normal, trash the anomaly; the training split of
``make_task``), same epochs, batch size, optimiser and loss (``training.methods.deepmad``): "together" is the
``GroupedAutoencoder`` with groups=m that ``fit_deepmad`` trains; "one after another" is m networks
with groups=1, each run through the same phase functions on its own class (phase 1) and on all normal
images with its class as positives and the rest as negatives (phase 2), each with its own optimiser and
its own pass over the data, as a loop over the classes would. The loss of the grouped network is the
sum of the m independent losses, so both are the same method; the test AUC of both is printed to show it
(they differ only by random initialisation and batch order).

Each is run twice: as the code trains ("ours": channels-last activations, glibc keeping freed memory)
and as plain torch (torch's default NCHW layout and allocator policy), which is what a user's loop over
classes gets; ``--ablation`` adds the grouped network with each of the two alone. "one after another,
plain torch" is the baseline of the target; "one after another, ours" shows what training together buys
by itself, with the layout and allocator held equal.

images/s counts one image once per encoder that processed it, in both phases, so the rows are comparable.
No augmentation (it costs the same for all and adds noise). Every run is a fresh process (the allocator
setting is process-wide), and with ``--repeats`` the rows are interleaved; the machine is shared and
noisy: read the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from flywheel.metrics import roc_auc
from training import engine, networks
from training.batches import Normaliser
from training.data import default_normal, load_dataset, make_task
from training.errors import run_command
from training.methods.deepmad import (
    DeepMADConfig,
    EncoderPhase,
    compute_centres,
    embed,
    pretrain_autoencoders,
    train_encoders,
)
from training.methods.pretraining import PhaseOne
from training.networks import GroupedAutoencoder

ROWS = {  # name -> (together, channels-last activations, glibc keeps freed memory)
    "together, ours": (True, True, True),
    "one after another, plain torch": (False, False, False),
    "together, plain torch": (True, False, False),
    "one after another, ours": (False, True, True),
}
ABLATION = {  # --ablation: each of the two settings alone
    "together, channels-last only": (True, True, False),
    "together, allocator only": (True, False, True),
}


@dataclass
class Run:
    name: str
    seconds: float
    cpu_seconds: float  # all of this process's threads, user + system: the work, less the waiting for a core
    images: int  # image-encoder passes, both phases
    auc: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _phase_images(class_sizes: list[int], n_train: int, config: DeepMADConfig) -> int:
    """Image-encoder passes of one encoder group in both phases (phase 1 wraps to the largest class)."""
    steps = math.ceil(max(class_sizes) / config.batch_size)
    return config.ae_epochs * steps * config.batch_size * len(class_sizes) + config.epochs * n_train * len(class_sizes)


def _distances(encoder, centres: torch.Tensor, images: torch.Tensor, normaliser: Normaliser) -> np.ndarray:
    z = embed(encoder, images, normaliser)  # [N, k, D] on the CPU
    return torch.sqrt((z - centres.cpu().unsqueeze(0)).pow(2).sum(-1)).numpy()


def train_together(task, config: DeepMADConfig, device: torch.device, name: str) -> Run:
    images, labels, class_images, normaliser, test = _tensors(task, device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    m, channels, size = task.n_normal, images.shape[-1], images.shape[1]
    start, cpu_start = time.perf_counter(), time.process_time()
    model = GroupedAutoencoder(m, channels, size, config.rep_dim).to(device)
    ae_opt = torch.optim.Adam(model.parameters(), lr=config.ae_lr, weight_decay=config.weight_decay)
    pretrain_autoencoders(model, PhaseOne(class_images, normaliser, config, ae_opt, generator))
    centres = compute_centres(model.encoder, class_images, normaliser)
    enc_opt = torch.optim.Adam(model.encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    train_encoders(EncoderPhase(model.encoder, centres, images, labels, normaliser, config, enc_opt, generator))
    _sync(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    scores = _distances(model.encoder, centres, test, normaliser).min(axis=1)
    passes = _phase_images([len(x) for x in class_images], len(images), config)
    return Run(name, seconds, cpu_seconds, passes, roc_auc(scores, task.test_anomalous))


def train_one_after_another(task, config: DeepMADConfig, device: torch.device, name: str) -> Run:
    images, labels, class_images, normaliser, test = _tensors(task, device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    channels, size = images.shape[-1], images.shape[1]
    columns, passes = [], 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, own in enumerate(class_images):
        model = GroupedAutoencoder(1, channels, size, config.rep_dim).to(device)
        ae_opt = torch.optim.Adam(model.parameters(), lr=config.ae_lr, weight_decay=config.weight_decay)
        pretrain_autoencoders(model, PhaseOne([own], normaliser, config, ae_opt, generator))
        centre = compute_centres(model.encoder, [own], normaliser)
        enc_opt = torch.optim.Adam(model.encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        one_vs_rest = torch.where(labels == i, 0, -1)  # -1: a negative for every encoder (here: the one)
        train_encoders(EncoderPhase(model.encoder, centre, images, one_vs_rest, normaliser, config, enc_opt, generator))
        _sync(device)
        columns.append((model.encoder, centre))
        passes += _phase_images([len(own)], len(images), config)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    distances = np.concatenate([_distances(enc, c, test, normaliser) for enc, c in columns], axis=1)
    return Run(name, seconds, cpu_seconds, passes, roc_auc(distances.min(axis=1), task.test_anomalous))


def _none(*_: object) -> None:
    return None


def _as_plain_torch(channels_last: bool, retain_memory: bool) -> None:
    """Undo, in this process, what the code does beyond torch's defaults (NCHW, glibc's allocator policy)."""
    if not channels_last:
        networks._channels_last = lambda x: x
    if not retain_memory:
        engine.retain_freed_memory = _none


def _tensors(task, device: torch.device):
    images = torch.from_numpy(task.train.images)
    labels = torch.from_numpy(task.train.labels)
    class_images = [images[labels == i] for i in range(task.n_normal)]
    normaliser = Normaliser.fit(images).to(device)
    return images, labels, class_images, normaliser, torch.from_numpy(task.test.images)


def _setup(args) -> tuple[DeepMADConfig, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = DeepMADConfig(
        ae_epochs=args.ae_epochs or (1 if args.quick else 2),
        epochs=args.epochs or (1 if args.quick else 3),
        augment=False,
        seed=0,
    )
    cap = (50 if args.quick else 200) if args.max_train_per_class is None else (args.max_train_per_class or None)
    dataset = load_dataset("trashnet")
    return config, make_task(dataset, default_normal(dataset), max_train_per_class=cap, seed=0)


def _worker(args) -> int:
    """One row on one device in this (fresh) process; prints the Run as JSON."""
    together, channels_last, retain_memory = {**ROWS, **ABLATION}[args.worker]
    _as_plain_torch(channels_last, retain_memory)
    config, task = _setup(args)
    train = train_together if together else train_one_after_another
    run = train(task, config, torch.device(args.devices), args.worker)
    print(json.dumps(run.__dict__))
    return 0


def _spawn(args, row: str, device: str) -> Run:
    command = [sys.executable, "-m", "bench.train", "--worker", row, "--devices", device]
    command += ["--quick"] if args.quick else []
    for flag in ("ae_epochs", "epochs", "max_train_per_class", "threads"):
        if getattr(args, flag) is not None:
            command += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return Run(**json.loads(out.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    """Bad input ends in one ``error:`` line and exit 2, before any server or training starts."""
    return run_command(lambda: _main(argv), "bench.train: interrupted")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 + 1 epochs on 50 training images per class")
    parser.add_argument("--ae-epochs", type=int, help="autoencoder epochs (default 2; quick 1)")
    parser.add_argument("--epochs", type=int, help="encoder epochs (default 3; quick 1)")
    parser.add_argument("--max-train-per-class", type=int, help="cap per class (default 200; quick 50; 0: all)")
    parser.add_argument("--devices", default="auto", help="comma-separated: cpu,cuda (auto: cpu, and cuda if present)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    repeats = "interleaved rounds of all rows; the median run is shown (of two: the faster)"
    parser.add_argument("--repeats", type=int, default=1, help=repeats)
    parser.add_argument("--ablation", action="store_true", help="also together with each setting alone")
    parser.add_argument("--worker", choices=[*ROWS, *ABLATION], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    config, task = _setup(args)
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])] if args.devices == "auto" else args.devices
    if isinstance(devices, str):
        devices = devices.split(",")
    print(
        f"bench.train: TrashNet {task.n_normal}/1, {len(task.train)} training images, {len(task.test)} test; "
        f"{config.ae_epochs} autoencoder + {config.epochs} encoder epochs, batch {config.batch_size}; "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}; {args.repeats} interleaved round(s), each run a fresh process",
        flush=True,
    )
    header = (
        f"{'device':<6} {'how':<32} | {'seconds':>8} {'images/s':>9} | {'CPU s':>7} {'/CPU s':>7} | {'test AUC':>8}"
    )
    rows: list[tuple[str, Run]] = []
    summary: dict[str, float] = {}
    for device in devices:
        runs: dict[str, list[Run]] = {row: [] for row in [*ROWS, *(ABLATION if args.ablation else [])]}
        for _ in range(args.repeats):
            for row in runs:
                runs[row].append(_spawn(args, row, device))
                print(f"  {device}: {row}: {runs[row][-1].rate:.0f} images/s", flush=True)
        median = {row: _median(found) for row, found in runs.items()}
        rows += [(device, run) for run in median.values()]
        rate = {row: run.rate for row, run in median.items()}
        summary[f"together_over_sequential_{device}"] = rate["together, ours"] / rate["one after another, plain torch"]
        summary[f"together_over_sequential_same_code_{device}"] = (
            rate["together, ours"] / rate["one after another, ours"]
        )
        summary[f"together_ours_over_plain_{device}"] = rate["together, ours"] / rate["together, plain torch"]
    print()
    print(header)
    print("-" * len(header))
    for device, run in rows:
        print(
            f"{device:<6} {run.name:<32} | {run.seconds:8.1f} {run.rate:9.0f} | "
            f"{run.cpu_seconds:7.1f} {run.images / run.cpu_seconds:7.0f} | {run.auc:8.3f}"
        )
    print(
        "images/s: one image counted once per encoder that processed it (both phases); load average now "
        f"{os.getloadavg()[0]:.1f}"
    )
    print("summary: " + " ".join(f"{k}={v:.2f}" for k, v in summary.items()))
    return 0


def _median(runs: list[Run]) -> Run:
    """The run with the median time (its own AUC: the AUC does not depend on the round)."""
    seconds = statistics.median_low([run.seconds for run in runs])
    return next(run for run in runs if run.seconds == seconds)


if __name__ == "__main__":
    sys.exit(main())
