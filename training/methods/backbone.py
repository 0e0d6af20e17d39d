"""DeepMAD on a pretrained backbone: one encoder head per normal class on shared EfficientNet-Lite features.

Algorithm 3 with the LeNet encoders replaced by E_i(x) = head_i(f(x)), f the ImageNet backbone
(``training.backbones``): ImageNet pretraining stands in for phase 1 (the autoencoders); the centres
are c_i = mean of E_i over class i; phase 2 is the same δ-margin loss (``deepmad.deepmad_loss``: class
i pulled onto c_i, the other classes and any outlier-exposure photo pushed past δ), or the one-class
pull alone for DeepSVDD. The score is the min distance over classes, as everywhere.

f is frozen, or its last ``tune_blocks`` MBConv blocks and head convolution are trained with the heads
(at the same learning rate). Whatever stays fixed is run once per photo and view and cached
(``training.features``), so 100 epochs cost about as much as one forward pass over the photos.
The features are standardised with the training photos' statistics (buffers, so the graph carries them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from service.manifest import TrainingLog
from training.backbones import Backbone, check_input_size, lite_normaliser
from training.batches import shuffled_batches
from training.data import Task
from training.engine import Checkpoint, RunOptions, progress_bar, run_epochs
from training.features import fixed_outputs
from training.methods.deepmad import DeepMADConfig, deepmad_loss, guard_centres
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


@torch.no_grad()
def head_centres(encoder: BackboneEncoder, fixed: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """c_i = mean of E_i over the (unmirrored) training photos of class i, guarded against zeros."""
    encoder.eval()
    z = torch.cat([encoder.from_fixed(fixed[s : s + 256]) for s in range(0, len(fixed), 256)])
    return guard_centres(torch.stack([z[labels == i, i].mean(0) for i in range(encoder.groups)]))


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
        backbone = Backbone.pretrained(config.backbone, config.tune_blocks)
        views = [False, True] if config.augment else [False]
        outputs = [torch.from_numpy(fixed_outputs(backbone, task.train.images, m, device)) for m in views]
        labels = torch.from_numpy(task.train.labels)
        channels = task.train.images.shape[3]
        return cls(backbone, torch.cat(outputs), labels.repeat(len(views)), len(labels), size, channels)


def train_heads(
    inputs: CachedInputs, task_identity: dict, n_normal: int, config: DeepMADConfig, run: RunOptions, one_class: bool
) -> tuple[BackboneEncoder, torch.Tensor, TrainingLog]:
    """Phase 2 on cached inputs: (encoder, centres [m, D], log), checkpointed every epoch.

    ``one_class``: DeepSVDD's objective (each head pulls its own class, sees nothing else) instead of DeepMAD's.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device, fixed, labels = run.device, inputs.fixed, inputs.labels
    photos, photo_labels = fixed[: inputs.n_photos], labels[: inputs.n_photos]
    pooled = pooled_features(inputs.backbone, photos[photo_labels >= 0])
    head = GroupedHead(n_normal, inputs.backbone.out_dim, config.head_hidden, config.rep_dim)
    mean, std = pooled.mean(0), pooled.std(0).clamp_min(1e-3)
    encoder = BackboneEncoder(inputs.backbone, head, inputs.size, mean, std, inputs.channels)
    encoder = encoder.to(device)
    trained = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=config.lr, weight_decay=config.weight_decay)
    log = TrainingLog()
    objective = "one-class" if one_class else "deepmad"
    identity = {"config": config.training_identity(), **task_identity, "objective": objective}
    state = Checkpoint(run.checkpoint, identity, {"encoder": encoder, "optimizer": optimizer}, generator)
    start, centres = 0, None
    if run.resume:
        restored = state.restore(("centres", "log", "epochs_done"))
        start, centres = restored["epochs_done"], restored["centres"]
        log = TrainingLog.model_validate(restored["log"])
    if centres is None:
        centres = head_centres(encoder, photos.to(device), photo_labels.to(device)).cpu()
    device_centres = centres.to(device)

    def step_loss(chosen: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        z = encoder.from_fixed(fixed[chosen].to(device))
        batch_labels = labels[chosen].to(device)
        if one_class:
            own = F.one_hot(batch_labels.clamp_min(0), n_normal).bool() & (batch_labels >= 0).unsqueeze(1)
            squared = (z - device_centres.unsqueeze(0)).pow(2).sum(-1)
            loss = (squared * own).sum(0).div(own.sum(0).clamp_min(1)).sum()
        else:
            loss, _ = deepmad_loss(z, device_centres, batch_labels, config.eta, config.delta, config.routing_margin)
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
    return encoder.eval(), centres, log


def fit_backbone(task: Task, config: DeepMADConfig, run: RunOptions, one_class: bool) -> tuple[Scorer, TrainingLog]:
    """Cache the backbone's fixed part over the training photos, train the heads, return the whole graph's scorer."""
    started = time.perf_counter()
    inputs = CachedInputs.of(task, config, run.device)
    extraction_seconds = max(time.perf_counter() - started, 1e-9)
    identity = {"classes": task.column_names, "training_data": task.content_sha256()}
    encoder, centres, log = train_heads(inputs, identity, task.n_normal, config, run, one_class)
    log.images_per_second["feature_extraction"] = len(inputs.fixed) / extraction_seconds
    return Scorer(encoder.cpu(), centres, lite_normaliser()).eval(), log
