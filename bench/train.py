"""Training benchmark: the m DeepMAD encoders trained together (one grouped network) vs one after another.

    .venv/bin/python -m bench.train             # 2 autoencoder + 3 encoder epochs, 200 images per class
    .venv/bin/python -m bench.train --quick     # 1 + 1 epochs on 50 images per class

Same data (TrashNet 5/1: the five recyclables normal, trash the anomaly; the training split of
``make_task``), same epochs, batch size, optimiser and loss (``training.deepmad``): "together" is the
``GroupedAutoencoder`` with groups=m that ``fit_deepmad`` trains; "one after another" is m networks
with groups=1, each run through the same phase functions on its own class (phase 1) and on all normal
images with its class as positives and the rest as negatives (phase 2). The loss of the grouped network
is the sum of the m independent losses, so both are the same method; the test AUC of both is printed to
show it (they differ only by random initialisation and batch order).

images/s counts one image once per encoder that processed it, in both phases, so the two are comparable.
No augmentation (it costs the same for both and adds noise). The machine is shared and noisy: the two
runs are back to back; read the ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from training.batches import Normaliser
from training.data import default_normal, load_dataset, make_task
from training.deepmad import DeepMADConfig, compute_centres, embed, pretrain_autoencoders, train_encoders
from training.metrics import roc_auc
from training.networks import GroupedAutoencoder


@dataclass
class Run:
    name: str
    seconds: float
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


def train_together(task, config: DeepMADConfig, device: torch.device) -> Run:
    images, labels, class_images, normaliser, test = _tensors(task, device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    m, channels, size = task.n_normal, images.shape[-1], images.shape[1]
    start = time.perf_counter()
    model = GroupedAutoencoder(m, channels, size, config.rep_dim).to(device)
    ae_opt = torch.optim.Adam(model.parameters(), lr=config.ae_lr, weight_decay=config.weight_decay)
    pretrain_autoencoders(model, class_images, normaliser, config, ae_opt, generator, 0, _none)
    centres = compute_centres(model.encoder, class_images, normaliser)
    enc_opt = torch.optim.Adam(model.encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    train_encoders(model.encoder, centres, images, labels, normaliser, config, enc_opt, generator, 0, _none)
    _sync(device)
    seconds = time.perf_counter() - start
    scores = _distances(model.encoder, centres, test, normaliser).min(axis=1)
    passes = _phase_images([len(x) for x in class_images], len(images), config)
    return Run("together (groups=m)", seconds, passes, roc_auc(scores, task.test_anomalous))


def train_one_after_another(task, config: DeepMADConfig, device: torch.device) -> Run:
    images, labels, class_images, normaliser, test = _tensors(task, device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    channels, size = images.shape[-1], images.shape[1]
    columns, passes = [], 0
    start = time.perf_counter()
    for i, own in enumerate(class_images):
        model = GroupedAutoencoder(1, channels, size, config.rep_dim).to(device)
        ae_opt = torch.optim.Adam(model.parameters(), lr=config.ae_lr, weight_decay=config.weight_decay)
        pretrain_autoencoders(model, [own], normaliser, config, ae_opt, generator, 0, _none)
        centre = compute_centres(model.encoder, [own], normaliser)
        enc_opt = torch.optim.Adam(model.encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        one_vs_rest = torch.where(labels == i, 0, -1)  # -1: a negative for every encoder (here: the one)
        train_encoders(model.encoder, centre, images, one_vs_rest, normaliser, config, enc_opt, generator, 0, _none)
        _sync(device)
        columns.append((model.encoder, centre))
        passes += _phase_images([len(own)], len(images), config)
    seconds = time.perf_counter() - start
    distances = np.concatenate([_distances(enc, c, test, normaliser) for enc, c in columns], axis=1)
    return Run("one after another (groups=1)", seconds, passes, roc_auc(distances.min(axis=1), task.test_anomalous))


def _none(*_: object) -> None:
    return None


def _tensors(task, device: torch.device):
    images = torch.from_numpy(task.train.images)
    labels = torch.from_numpy(task.train.labels)
    class_images = [images[labels == i] for i in range(task.n_normal)]
    normaliser = Normaliser.fit(images).to(device)
    return images, labels, class_images, normaliser, torch.from_numpy(task.test.images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 + 1 epochs on 50 training images per class")
    parser.add_argument("--ae-epochs", type=int, help="autoencoder epochs (default 2; quick 1)")
    parser.add_argument("--epochs", type=int, help="encoder epochs (default 3; quick 1)")
    parser.add_argument("--max-train-per-class", type=int, help="cap per class (default 200; quick 50; 0: all)")
    parser.add_argument("--devices", default="auto", help="comma-separated: cpu,cuda (auto: cpu, and cuda if present)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
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
    task = make_task(dataset, default_normal(dataset), max_train_per_class=cap, seed=0)
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])] if args.devices == "auto" else args.devices
    if isinstance(devices, str):
        devices = devices.split(",")
    print(
        f"bench.train: TrashNet {task.n_normal}/1, {len(task.train)} training images, {len(task.test)} test; "
        f"{config.ae_epochs} autoencoder + {config.epochs} encoder epochs, batch {config.batch_size}; "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    header = f"{'device':<6} {'how':<30} | {'seconds':>8} {'images/s':>9} | {'test AUC':>8}"
    rows, ratios = [], {}
    for name in devices:
        device = torch.device(name)
        apart = train_one_after_another(task, config, device)
        together = train_together(task, config, device)
        ratios[name] = together.rate / apart.rate
        rows += [(name, together), (name, apart)]
        print(f"  {name}: together {together.rate:.0f} images/s, one after another {apart.rate:.0f}", flush=True)
    print()
    print(header)
    print("-" * len(header))
    for name, run in rows:
        print(f"{name:<6} {run.name:<30} | {run.seconds:8.1f} {run.rate:9.0f} | {run.auc:8.3f}")
    print("images/s: one image counted once per encoder that processed it (both phases)")
    print("summary: " + " ".join(f"together_over_sequential_{k}={v:.2f}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
