"""DeepMAD on a pretrained backbone: one encoder head per normal class on shared EfficientNet-Lite features.

Algorithm 3 with the LeNet encoders replaced by E_i(x) = head_i(f(x)), f the ImageNet backbone
(``training.backbones``): ImageNet pretraining stands in for phase 1 (the autoencoders); the centres
are c_i = mean of E_i over class i; phase 2 is the same δ-margin loss (``deepmad.deepmad_loss``: class
i pulled onto c_i, the other classes and any outlier-exposure photo pushed past δ), or the one-class
pull alone for DeepSVDD. The score is the min distance over classes, as everywhere.

f is frozen: its pooled features are run once per photo and view and cached (``training.features``),
so 100 epochs of heads cost about as much as one forward pass over the photos (``train_heads``). Or
its last ``tune_blocks`` MBConv blocks (``all``: every block) and head convolution train with the heads
(``train_tuned``): every batch then runs through the backbone, freshly augmented (crops, flips,
colour: ``--augment``), with AdamW on a one-cycle schedule (``--backbone-lr`` for the backbone, ``--lr``
for the heads). BatchNorm keeps ImageNet's running statistics in both (``Backbone.train``): batches of
32 photos of five classes would estimate them worse than ImageNet did, and the statistics the graph
is exported with are then the ones training saw. The centres come from the ImageNet features and the
initial heads, and stay fixed (DeepSVDD's rule): a tuned backbone cannot move them.

The features are standardised with the training photos' statistics (buffers, so the graph carries them).
Labelled anomalies (outlier exposure) are pushed from the normal centres (``deepmad.AnomalyTerms``); with
``--anomaly-centres k`` they are k clusters (``training.kmeans`` of their standardised features), each a
head and centre of its own, and the graph's score becomes d_min(normal) - d_min(anomaly centres).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from service.manifest import TrainingLog
from training.backbones import Backbone, check_input_size, lite_normaliser
from training.batches import shuffled_batches, to_float
from training.data import Task
from training.engine import Checkpoint, RunOptions, autocast, progress_bar, run_epochs
from training.errors import UserError
from training.features import fixed_outputs
from training.kmeans import kmeans
from training.methods.deepmad import AnomalyTerms, DeepMADConfig, deepmad_loss, guard_centres
from training.networks import LEAK
from training.scorer import Scorer


class GroupedHead(nn.Module):
    """m heads on one shared feature vector: [B, F] -> [B, m, D], no biases (DeepSVDD's rule against a
    constant map onto the centre). ``hidden`` > 0: two layers with a leaky ReLU between; 0: one linear map."""

    def __init__(self, groups: int, in_dim: int, hidden: int, rep_dim: int):
        super().__init__()
        self.groups, self.rep_dim = groups, rep_dim
        width = hidden or rep_dim
        self.first = nn.Linear(in_dim, groups * width, bias=False)  # m first layers read the same input: one matmul
        self.second = nn.Conv1d(groups * hidden, groups * rep_dim, 1, bias=False, groups=groups) if hidden else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.first(features)
        if self.second is not None:
            out = self.second(F.leaky_relu(out, LEAK).unsqueeze(-1))
        return out.reshape(features.shape[0], self.groups, self.rep_dim)


class BackboneEncoder(nn.Module):
    """Backbone -> feature standardisation -> m heads; ``embed_shared`` is what ``scorer.Scorer`` calls."""

    def __init__(
        self, backbone: Backbone, head: GroupedHead, size: int, mean: torch.Tensor, std: torch.Tensor, channels: int = 3
    ):
        super().__init__()
        self.backbone, self.head = backbone, head
        # A grey photo (channels 1) is broadcast to the backbone's three channels by the input standardisation.
        self.groups, self.rep_dim, self.channels, self.size = head.groups, head.rep_dim, channels, size
        self.register_buffer("feature_mean", mean.float().view(1, -1))
        self.register_buffer("feature_std", std.float().view(1, -1))

    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head((pooled - self.feature_mean) / self.feature_std)

    def from_fixed(self, fixed: torch.Tensor) -> torch.Tensor:
        """Cached fixed-part outputs (``features.fixed_outputs``) -> [B, m, D]."""
        return self.from_pooled(self.backbone.tuned(fixed) if self.backbone.trains else fixed)

    def embed_shared(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised images [B, 3, S, S] -> [B, m, D]."""
        return self.from_pooled(self.backbone(x))


@torch.no_grad()
def pooled_features(backbone: Backbone, fixed: torch.Tensor) -> torch.Tensor:
    """Cached fixed-part outputs -> the backbone's pooled features with its initial (ImageNet) weights."""
    backbone.eval()
    return (
        torch.cat([backbone.tuned(fixed[s : s + 256]) for s in range(0, len(fixed), 256)]) if backbone.trains else fixed
    )


def starting_backbone(config: DeepMADConfig, tune_blocks: int) -> Backbone:
    """ImageNet's weights, or ``--backbone-weights`` (a fine-tuned model's backbone.pt)."""
    weights = Path(config.backbone_weights) if config.backbone_weights else None
    return Backbone.pretrained(config.backbone, tune_blocks, weights)


def anomaly_labels(pooled: torch.Tensor, labels: torch.Tensor, n_normal: int, config: DeepMADConfig) -> torch.Tensor:
    """Labels with every labelled anomaly (-1) moved to its anomaly centre's column (n_normal + cluster)
    when ``--anomaly-centres`` k > 0; the clusters are k-means of their standardised pooled features."""
    anomalies = labels < 0
    if config.anomaly_centres == 0 or not anomalies.any():
        return labels
    clusters = kmeans(pooled[anomalies], config.anomaly_centres, torch.Generator().manual_seed(config.seed))
    relabelled = labels.clone()
    relabelled[anomalies] = n_normal + clusters
    return relabelled


def check_anomaly_terms(labelled: int, config: DeepMADConfig) -> None:
    """Anomaly centres need at least k labelled anomalies (a UserError before training)."""
    if config.anomaly_centres > labelled:
        raise UserError(
            f"--anomaly-centres {config.anomaly_centres} needs at least that many labelled anomalies in training "
            "(--anomaly-holdout with --outlier-exposure, --exposure-from-train, --composites, or a folder's anomaly "
            f"class); found {labelled}"
        )


def starting_encoder(
    backbone: Backbone, pooled: torch.Tensor, labels: torch.Tensor, n_normal: int, config: DeepMADConfig, shape
) -> tuple[BackboneEncoder, torch.Tensor]:
    """The untrained encoder on ``backbone`` (feature statistics of the normal photos' starting ``pooled``
    features, one head per class and anomaly centre) and the labels with anomalies on their centres' columns.
    ``shape``: the photos' (size, channels)."""
    check_anomaly_terms(int((labels < 0).sum()), config)
    normal = labels >= 0
    mean, std = pooled[normal].mean(0), pooled[normal].std(0).clamp_min(1e-3)
    labels = anomaly_labels((pooled - mean) / std, labels, n_normal, config)
    head = GroupedHead(n_normal + config.anomaly_centres, backbone.out_dim, config.head_hidden, config.rep_dim)
    return BackboneEncoder(backbone, head, shape[0], mean, std, shape[1]), labels


@torch.no_grad()
def column_centres(encoder: BackboneEncoder, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """c_j = mean of E_j over the photos of column j (a class or an anomaly centre), from the starting
    features and heads, guarded against zeros."""
    encoder.eval()
    z = torch.cat([encoder.from_pooled(pooled[s : s + 256]) for s in range(0, len(pooled), 256)])
    return guard_centres(torch.stack([z[labels == j, j].mean(0) for j in range(encoder.groups)]))


def objective(
    z: torch.Tensor,
    centres: torch.Tensor,
    labels: torch.Tensor,
    n_normal: int,
    config: DeepMADConfig,
    one_class: bool,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepMAD's loss with the anomaly terms, or DeepSVDD's (each head pulls its own class, sees nothing else)."""
    if one_class:
        own = F.one_hot(labels.clamp_min(0), n_normal).bool() & (labels >= 0).unsqueeze(1)
        squared = (z - centres.unsqueeze(0)).pow(2).sum(-1)
        return (squared * own).sum(0).div(own.sum(0).clamp_min(1)).sum()
    terms = AnomalyTerms.of(config)
    loss, _ = deepmad_loss(z, centres, labels, config.eta, config.delta, config.routing_margin, terms, class_weights)
    return loss


def inverse_frequency(labels: torch.Tensor, n_normal: int) -> torch.Tensor:
    """[m]: n / (m * n_c) over the normal photos, so each class weighs the same in ``--class-push``."""
    counts = torch.bincount(labels[(labels >= 0) & (labels < n_normal)], minlength=n_normal).float()
    return counts.sum() / (n_normal * counts.clamp_min(1))


@dataclass
class CachedInputs:
    """The training photos as the backbone's cached fixed-part outputs, every view stacked, with labels.

    The first ``n_photos`` rows are the photos as they are (centres and feature statistics come from
    those); with ``--augment`` their mirror images follow. A caller with features in hand (a
    cross-validation fold) builds one directly instead of through ``of``.
    """

    backbone: Backbone
    fixed: torch.Tensor
    labels: torch.Tensor
    n_photos: int
    size: int
    channels: int = 3

    @classmethod
    def of(cls, task: Task, config: DeepMADConfig, device: torch.device) -> CachedInputs:
        size = task.train.images.shape[1]
        check_input_size(config.backbone, size)
        backbone = starting_backbone(config, config.tune_blocks)
        views = [False, True] if config.augment else [False]
        outputs = [torch.from_numpy(fixed_outputs(backbone, task.train.images, m, device)) for m in views]
        labels = torch.from_numpy(task.train.labels)
        channels = task.train.images.shape[3]
        return cls(backbone, torch.cat(outputs), labels.repeat(len(views)), len(labels), size, channels)


def filled(inputs: CachedInputs, n_normal: int, seed: int) -> CachedInputs:
    """``--fill-classes``: every class with fewer photos than the median class gets rows up to that count, each
    its photos' mean feature plus a photo of a class that has the count, as an offset from that class's mean
    (the same draw in every view). A head learnt from 30 photos memorises them, so its class's unseen photos
    land far from its centre and the old heads claim them; borrowed offsets teach it how a class spreads
    (bench.new_class measures it)."""
    photos = inputs.n_photos
    labels = inputs.labels[:photos]
    counts = torch.bincount(labels[labels >= 0], minlength=n_normal)
    target = int(counts.median())
    donors = torch.nonzero((labels >= 0) & (counts[labels.clamp_min(0)] >= target)).squeeze(1)
    generator = torch.Generator().manual_seed(seed)
    chosen, new_labels = [], []
    for column in range(n_normal):
        missing = target - int(counts[column])
        if 0 < missing < target:  # a class with no photo has no mean to fill around
            chosen.append(donors[torch.randint(len(donors), (missing,), generator=generator)])
            new_labels.append(torch.full((missing,), column, dtype=labels.dtype))
    if not chosen:
        return inputs
    chosen, new_labels = torch.cat(chosen), torch.cat(new_labels)
    normal, views = labels >= 0, []
    for view in inputs.fixed.split(photos):
        sums = torch.zeros(n_normal, view.shape[1]).index_add_(0, labels[normal], view[normal])
        means = sums / counts.clamp_min(1).unsqueeze(1)
        offsets = view[chosen] - means[labels[chosen]]
        views += [view, means[new_labels] + offsets]
    fixed = torch.cat(views)
    all_labels = torch.cat([labels, new_labels]).repeat(len(views) // 2)
    return CachedInputs(inputs.backbone, fixed, all_labels, photos + len(chosen), inputs.size, inputs.channels)


def few_photo_scales(labels: torch.Tensor, n_normal: int, k: float) -> torch.Tensor:
    """[m]: 1 - k (1 - n_c / median) for a class with n_c photos below the median count, 1 otherwise
    (``--class-scale``)."""
    counts = torch.bincount(labels[(labels >= 0) & (labels < n_normal)], minlength=n_normal).float()
    return 1 - k * (1 - counts / counts.median()).clamp_min(0)


@torch.no_grad()
def scale_columns(encoder: BackboneEncoder, centres: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Distance to centre j times scales[j], exactly: the heads have no biases, so head j's last layer and
    its centre are scaled. Returns the centres (the anomaly centres' columns after ``scales`` are kept)."""
    last = encoder.head.second if encoder.head.second is not None else encoder.head.first
    rows = torch.ones(encoder.groups, device=scales.device)
    rows[: len(scales)] = scales
    factor = rows.repeat_interleave(encoder.rep_dim).to(last.weight.device)
    last.weight.mul_(factor.view(-1, *([1] * (last.weight.dim() - 1))))
    return centres * rows.unsqueeze(1).to(centres.device)


def train_heads(
    inputs: CachedInputs, task_identity: dict, n_normal: int, config: DeepMADConfig, run: RunOptions, one_class: bool
) -> tuple[BackboneEncoder, torch.Tensor, TrainingLog]:
    """Phase 2 on cached inputs: (encoder, centres [m + k, D], log), checkpointed every epoch.

    ``one_class``: DeepSVDD's objective (each head pulls its own class, sees nothing else) instead of DeepMAD's.
    """
    scales = few_photo_scales(inputs.labels[: inputs.n_photos], n_normal, config.class_scale)
    if config.fill_classes:
        inputs = filled(inputs, n_normal, config.seed)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device, fixed = run.device, inputs.fixed
    pooled = pooled_features(inputs.backbone, fixed[: inputs.n_photos])
    shape = (inputs.size, inputs.channels)
    encoder, photo_labels = starting_encoder(
        inputs.backbone, pooled, inputs.labels[: inputs.n_photos], n_normal, config, shape
    )
    labels = photo_labels.repeat(len(fixed) // inputs.n_photos)
    encoder = encoder.to(device)
    trained = [p for p in encoder.parameters() if p.requires_grad]
    # Fused: one pass over the ~2M head weights per step instead of seven (measured 193 -> 23 ms a step on 2 busy
    # cores: most of a warm flywheel retrain's heads time); the same update up to float rounding.
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(trained, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    log = TrainingLog()
    objective_name = "one-class" if one_class else "deepmad"
    identity = {"config": config.training_identity(), **task_identity, "objective": objective_name}
    state = Checkpoint(run.checkpoint, identity, {"encoder": encoder, "optimizer": optimizer}, generator)
    start, centres = 0, None
    if run.resume:
        restored = state.restore(("centres", "log", "epochs_done"))
        start, centres = restored["epochs_done"], restored["centres"]
        log = TrainingLog.model_validate(restored["log"])
    if centres is None:
        centres = column_centres(encoder, pooled.to(device), photo_labels.to(device)).cpu()
    device_centres = centres.to(device)
    weights = inverse_frequency(photo_labels, n_normal).to(device)

    def step_loss(chosen: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        z = encoder.from_fixed(fixed[chosen].to(device))
        loss = objective(z, device_centres, labels[chosen].to(device), n_normal, config, one_class, weights)
        return loss, {"encoder_loss": loss.item()}

    def after_epoch(epoch: int, means: dict[str, float]) -> None:
        log.append(means)
        state.save(centres=centres, log=log.model_dump(), epochs_done=epoch + 1)

    started = time.perf_counter()
    batches = lambda: shuffled_batches(len(fixed), config.batch_size, generator)  # noqa: E731
    run_epochs(
        encoder, optimizer, config.epochs, start, batches, step_loss, after_epoch, progress_bar(run.progress), "heads"
    )
    log.images_per_second["heads"] = (config.epochs - start) * len(fixed) / max(time.perf_counter() - started, 1e-9)
    if config.class_scale:
        centres = scale_columns(encoder, centres, scales)
    return encoder.eval(), centres, log


def tune_end_to_end(
    network: nn.Module,
    images: np.ndarray,
    labels: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    config: DeepMADConfig,
    run: RunOptions,
    identity: dict,
    progress: dict | None = None,
) -> tuple[TrainingLog, dict]:
    """The loop of every end-to-end tuning (DeepMAD's heads, and the benches' classifier tuned the same way):
    every batch of uint8 photos augmented afresh (``config.augmentation``), through ``network.embed_shared``
    (its ``backbone``'s trainable blocks and its ``head``), AdamW on a one-cycle schedule (peaks
    ``backbone_lr`` and ``lr``), a checkpoint after every epoch that resumes exactly (weights, AdamW,
    schedule, both generators). ``progress`` goes into every checkpoint (centres); returns (log, progress
    as restored or given)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = run.device
    groups = [
        {"params": [p for p in network.backbone.parameters() if p.requires_grad], "lr": config.backbone_lr},
        {"params": list(network.head.parameters()), "lr": config.lr},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    steps = math.ceil(len(images) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[config.backbone_lr, config.lr], total_steps=max(config.epochs * steps, 1)
    )
    log, progress = TrainingLog(), dict(progress or {})
    parts = {"network": network, "optimizer": optimizer, "schedule": schedule}
    state = Checkpoint(run.checkpoint, {"config": config.training_identity(), **identity}, parts, generator)
    start = 0
    if run.resume:
        restored = state.restore(("log", "epochs_done", "progress"))
        start, progress = restored["epochs_done"], restored["progress"]
        log = TrainingLog.model_validate(restored["log"])
    normaliser, photos = lite_normaliser().to(device), torch.from_numpy(images)

    def step_loss(chosen: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x = to_float(photos[chosen].to(device), normaliser, config.augmentation, generator)
        with autocast(device):
            out = network.embed_shared(x)
        value = loss(out.float(), labels[chosen].to(device))
        return value, {"encoder_loss": value.item()}

    def after_epoch(epoch: int, means: dict[str, float]) -> None:
        log.append(means)
        state.save(log=log.model_dump(), epochs_done=epoch + 1, progress=progress)

    started = time.perf_counter()
    batches = lambda: shuffled_batches(len(images), config.batch_size, generator)  # noqa: E731
    bar = progress_bar(run.progress)
    run_epochs(network, optimizer, config.epochs, start, batches, step_loss, after_epoch, bar, "tuning", None, schedule)
    seconds = max(time.perf_counter() - started, 1e-9)
    log.images_per_second["backbone_and_heads"] = (config.epochs - start) * len(images) / seconds
    return log, progress


def train_tuned(
    images: np.ndarray,
    labels: torch.Tensor,
    n_normal: int,
    identity: dict,
    config: DeepMADConfig,
    run: RunOptions,
    one_class: bool,
) -> tuple[BackboneEncoder, torch.Tensor, TrainingLog]:
    """Heads and the backbone's tuned blocks together on freshly augmented photos (labels: column or -1):
    (encoder, centres [m + k, D], log). The centres come from the starting backbone and heads, fixed."""
    check_input_size(config.backbone, images.shape[1])
    torch.manual_seed(config.seed)  # the heads' initialisation, as in an uninterrupted run
    backbone = starting_backbone(config, config.tune_blocks)
    pooled = torch.from_numpy(fixed_outputs(starting_backbone(config, 0), images, False, run.device))
    shape = (images.shape[1], images.shape[3])
    encoder, labels = starting_encoder(backbone, pooled, labels, n_normal, config, shape)
    encoder = encoder.to(run.device)
    centres = column_centres(encoder, pooled.to(run.device), labels.to(run.device)).cpu()
    device_centres = centres.to(run.device)
    identity = {**identity, "objective": "one-class" if one_class else "deepmad"}

    def loss(z: torch.Tensor, batch_labels: torch.Tensor) -> torch.Tensor:
        return objective(z, device_centres, batch_labels, n_normal, config, one_class)

    log, _ = tune_end_to_end(encoder, images, labels, loss, config, run, identity)
    return encoder.eval(), centres, log


def fit_backbone(task: Task, config: DeepMADConfig, run: RunOptions, one_class: bool) -> tuple[Scorer, TrainingLog]:
    """Train the heads (on cached features) or the heads with the backbone's tuned blocks; return the graph's scorer."""
    identity = {"classes": task.column_names, "training_data": task.content_sha256()}
    if config.tune_blocks:
        labels = torch.from_numpy(task.train.labels)
        encoder, centres, log = train_tuned(task.train.images, labels, task.n_normal, identity, config, run, one_class)
    else:
        started = time.perf_counter()
        inputs = CachedInputs.of(task, config, run.device)
        extraction_seconds = max(time.perf_counter() - started, 1e-9)
        encoder, centres, log = train_heads(inputs, identity, task.n_normal, config, run, one_class)
        log.images_per_second["feature_extraction"] = len(inputs.fixed) / extraction_seconds
    return Scorer(encoder.cpu(), centres, lite_normaliser(), config.anomaly_centres).eval(), log
