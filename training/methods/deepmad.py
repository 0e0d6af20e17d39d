"""DeepMAD (paper Algorithm 3): autoencoder pretraining per class, centres, then the contrastive loss.

Phase 1 can also be rotation prediction (``methods.rotation``, ``--pretrain rotation``) or two-view
contrast (``methods.contrastive``, ``--pretrain contrastive``) in place of the autoencoders; centres
and phase 2 are the same either way.

L(theta_i) = 1/N sum_{x in X_i} ||E_i(x) - c_i||^2
           + eta/N sum_{x in X_j, j != i} max(0, delta - ||E_i(x) - c_i||)^2 + lambda/2 sum ||W||^2

With ``--routing-margin m`` (not in the paper) the sum gains a term that couples the encoders, for the
bin's routing (nearest class): eta/N sum_{x in X_i} max(0, m + d_i(x) - min_{j != i} d_j(x))^2.

Every encoder sees every normal training image in phase 2 (its own class as positives, the others as
negatives), so the m encoders share each batch and train as one grouped network. lambda is Adam's
weight decay (it adds lambda * W to the gradient, the derivative of lambda/2 ||W||^2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from service.manifest import EpochChoice, TrainingLog
from training.batches import Normaliser, shuffled_batches, to_float
from training.data import Task
from training.engine import (
    BestEpochs,
    Checkpoint,
    EpochCallback,
    Progress,
    RunOptions,
    Timer,
    TrainingInputs,
    autocast,
    progress_bar,
    run_epochs,
)
from training.epoch_choice import RECORD_FIELDS, HeldOutScores, check_criterion
from training.errors import UserError
from training.methods.config import DeepMADConfig
from training.methods.contrastive import ProjectionHead, pretrain_contrastive
from training.methods.pretraining import PhaseOne, ignore_epoch
from training.methods.rotation import RotationHead, pretrain_rotation
from training.networks import GroupedAutoencoder, GroupedEncoder
from training.scorer import Scorer


class SelfSupervised(NamedTuple):
    """A self-supervised phase 1 in place of the autoencoders: its head, its training, its checkpoint part."""

    head: type[RotationHead | ProjectionHead]
    train: Callable[[GroupedEncoder, RotationHead | ProjectionHead, PhaseOne], None]
    checkpoint_part: str


SELF_SUPERVISED = {
    "rotation": SelfSupervised(RotationHead, pretrain_rotation, "rotation_head"),
    "contrastive": SelfSupervised(ProjectionHead, pretrain_contrastive, "projection_head"),
}
CENTRE_EPS = 0.1  # DeepSVDD: a centre component near 0 is pushed to +-eps (a zero unit is trivially matched)


DEEPSAD_EPS = 0.1  # Deep SAD's inverse-distance push eta_a / (d^2 + eps): bounded where an anomaly sits on a centre


@dataclass(frozen=True)
class AnomalyTerms:
    """How labelled anomalies teach the encoders (``--anomaly-push``, ``--anomaly-weight``, ``--anomaly-centres``).

    ``push`` "hinge" is the paper's: an anomaly is a negative for every normal encoder, silent once it
    is delta away. "deepsad" pushes it from every normal centre by ``weight`` / (d^2 + DEEPSAD_EPS), a
    term that keeps teaching past delta. ``centres`` k > 0: the last k columns are centres of labelled
    anomalies, pulled like a class (labels m..m+k-1) and kept delta away from everything else.
    """

    push: str = "hinge"
    weight: float = 20.0
    centres: int = 0
    classes: float = 0.0  # > 0: the other classes' photos are anomalies too, pushed by classes / (d^2 + eps)

    @classmethod
    def of(cls, config: DeepMADConfig) -> AnomalyTerms:
        return cls(config.anomaly_push, config.anomaly_weight, config.anomaly_centres, config.class_push)


def deepmad_loss(
    embeddings: torch.Tensor,
    centres: torch.Tensor,
    labels: torch.Tensor,
    eta: float,
    delta: float,
    routing_margin: float = 0.0,
    anomaly: AnomalyTerms = AnomalyTerms(),
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch estimate of the sum over encoders of L(theta_i), without the weight-decay term.

    embeddings [B, m + k, D]; centres [m + k, D] (k = ``anomaly.centres``); labels [B] in 0..m+k-1
    (m.. : an anomaly centre's) or -1 (a labelled anomaly without a centre). Normal photos are pulled
    onto their own centre and pushed past delta from every other (the paper's loss); a labelled
    anomaly is pushed from the normal centres by ``anomaly.push`` (``AnomalyTerms``); with ``anomaly.classes``
    a normal photo is pushed from the other normal centres the Deep SAD way instead of by the hinge, scaled by
    its class's ``class_weights`` [m] (inverse class frequency: a class of 30 photos pushes as hard as one
    of 300). Returns (total,
    per-encoder [m + k]); the routing-margin term (module docstring) is in the total only, as it
    belongs to no single encoder. Dividing by the batch size is the batch estimate of 1/N.
    """
    n_normal = centres.shape[0] - anomaly.centres
    squared = (embeddings - centres.unsqueeze(0)).pow(2).sum(-1)  # [B, m + k]
    columns = torch.arange(centres.shape[0], device=labels.device).unsqueeze(0)
    positive = labels.unsqueeze(1) == columns
    is_anomaly = ((labels < 0) | (labels >= n_normal)).unsqueeze(1)
    distance = torch.sqrt(squared + 1e-12)
    pull = torch.where(positive, squared, torch.zeros_like(squared))
    hinge = eta * torch.relu(delta - distance).pow(2)
    from_normal_centre = is_anomaly & (columns < n_normal)
    if anomaly.push == "deepsad":
        anomaly_push = anomaly.weight / (squared + DEEPSAD_EPS)
        push = torch.where(from_normal_centre, anomaly_push, hinge)
    else:
        push = hinge
    if anomaly.classes > 0:
        other_class = ~is_anomaly & (columns < n_normal)
        class_push = anomaly.classes / (squared + DEEPSAD_EPS)
        if class_weights is not None:
            class_push = class_push * class_weights[labels.clamp(0, n_normal - 1)].unsqueeze(1)
        push = torch.where(other_class, class_push, push)
    push = torch.where(positive, torch.zeros_like(squared), push)
    per_encoder = (pull + push).mean(0)
    total = per_encoder.sum()
    if routing_margin > 0 and n_normal > 1:
        normal_distance = distance[:, :n_normal]
        own_column = positive[:, :n_normal]
        own = torch.where(own_column, normal_distance, torch.zeros_like(normal_distance)).sum(1)
        nearest_other = torch.where(own_column, torch.full_like(normal_distance, float("inf")), normal_distance)
        violation = torch.relu(routing_margin + own - nearest_other.min(1).values).pow(2)
        normal_row = (labels >= 0) & (labels < n_normal)
        total = total + eta * torch.where(normal_row, violation, torch.zeros_like(violation)).mean()
    return total, per_encoder


def guard_centres(centres: torch.Tensor, eps: float = CENTRE_EPS) -> torch.Tensor:
    near_zero = centres.abs() < eps
    return torch.where(
        near_zero & (centres < 0),
        torch.full_like(centres, -eps),
        torch.where(near_zero, torch.full_like(centres, eps), centres),
    )


@torch.no_grad()
def compute_centres(
    encoder: GroupedEncoder,
    class_images: list[torch.Tensor],
    normaliser: Normaliser,
    batch_size: int = 512,
    views: int = 0,
    augment: bool | str = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """c_i = mean of E_i(X_i) (eval mode), guarded against near-zero components. Returns [m, D].

    With ``views`` > 0 the mean runs over that many augmented views of every photo instead: the centre
    of what the encoder sees in training rather than of the photos it will memorise.
    """
    encoder.eval()
    device = next(encoder.parameters()).device
    centres = []
    for group, images in enumerate(class_images):
        total = torch.zeros(encoder.rep_dim, device=device, dtype=torch.float64)
        for _ in range(max(views, 1)):
            for start in range(0, len(images), batch_size):
                chosen = images[start : start + batch_size].to(device)
                x = to_float(chosen, normaliser, augment, generator) if views else to_float(chosen, normaliser)
                total += encoder.embed_shared(x)[:, group].double().sum(0)
        centres.append(total / (len(images) * max(views, 1)))
    return guard_centres(torch.stack(centres).float())


@torch.no_grad()
def embed(encoder: GroupedEncoder, images: torch.Tensor, normaliser: Normaliser, batch_size: int = 512) -> torch.Tensor:
    """Eval-mode embeddings [N, m, D] of uint8 NHWC images."""
    encoder.eval()
    device = next(encoder.parameters()).device
    out = [
        encoder.embed_shared(to_float(images[s : s + batch_size].to(device), normaliser)).float().cpu()
        for s in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


def pretrain_autoencoders(autoencoder: GroupedAutoencoder, phase: PhaseOne) -> None:
    """Phase 1: autoencoder A_i on X_i only, MSE; each step gives group i a batch of class i (``PhaseOne``).
    ``on_epoch`` gets ``{"autoencoder_mse": ...}``."""
    device = next(autoencoder.parameters()).device

    def step_loss(chosen: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = phase.batch(chosen, device, phase.config.augmentation)  # [B, m, C, H, W]
        with autocast(device):
            reconstruction = autoencoder(batch)
        # Mean squared error per autoencoder, summed over the m independent autoencoders.
        loss = (reconstruction.float() - batch).pow(2).mean(dim=(0, 2, 3, 4)).sum()
        return loss, {"autoencoder_mse": loss.item() / len(chosen)}

    phase.run(autoencoder, step_loss, "autoencoders")


@dataclass
class EncoderPhase:
    """Phase 2's inputs: the grouped encoder, trained against fixed centres on the training tensors.

    A phase-2 function (``train_encoders`` for DeepMAD, ``deepsvdd.train_one_class_encoders`` for
    DeepSVDD(m)) takes one of these, chooses its batches and its loss, and calls ``run``.
    """

    encoder: GroupedEncoder
    centres: torch.Tensor  # [m, D], moved to the encoder's device by ``device_centres``
    images: torch.Tensor  # uint8 [N, H, W, C]
    labels: torch.Tensor  # [N]: the class column, or -1 (a negative for every encoder)
    normaliser: Normaliser  # on the encoder's device
    config: DeepMADConfig
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    start_epoch: int = 0
    on_epoch: EpochCallback = ignore_epoch
    progress: Progress | None = None

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def device_centres(self) -> torch.Tensor:
        return self.centres.to(self.device)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the standardised (and, with ``augment``, augmented) float batch on the device."""
        return to_float(images.to(self.device), self.normaliser, self.config.augmentation, self.generator)

    def run(self, batches, step_loss, label: str) -> None:
        run_epochs(
            self.encoder,
            self.optimizer,
            self.config.epochs,
            self.start_epoch,
            batches,
            step_loss,
            self.on_epoch,
            self.progress,
            label,
        )


PhaseTwo = Callable[[EncoderPhase], None]


def train_encoders(phase: EncoderPhase) -> None:
    """Phase 2: every encoder on every normal image with the contrastive loss (labels: class column)."""
    centres, images, labels, config = phase.device_centres(), phase.images, phase.labels, phase.config

    def step_loss(chosen: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x = phase.to_input(images[chosen])
        with autocast(phase.device):
            z = phase.encoder.embed_shared(x)
        batch_labels = labels[chosen].to(phase.device)
        loss, _ = deepmad_loss(
            z.float(), centres, batch_labels, config.eta, config.delta, config.routing_margin, AnomalyTerms.of(config)
        )
        return loss, {"encoder_loss": loss.item()}

    phase.run(lambda: shuffled_batches(len(images), config.batch_size, phase.generator), step_loss, "encoders")


@dataclass
class _Setup:
    """What a DeepMAD run trains and checkpoints: the models, their optimisers, the checkpoint, and the
    per-epoch record when an epoch other than the last is exported."""

    model: GroupedAutoencoder
    head: RotationHead | ProjectionHead | None
    ae_optimizer: torch.optim.Optimizer
    enc_optimizer: torch.optim.Optimizer
    state: Checkpoint
    best_epochs: BestEpochs | None
    held_out: HeldOutScores | None

    @classmethod
    def of(
        cls, task: Task, config: DeepMADConfig, run: RunOptions, encoder_phase: PhaseTwo, inputs: TrainingInputs
    ) -> _Setup:
        device = run.device
        model = GroupedAutoencoder(
            task.n_normal, inputs.channels, inputs.size, config.rep_dim, config.dropout, config.width
        )
        model = model.to(device)
        # Self-supervised pretraining trains the encoders and a small head instead of the autoencoders.
        head = None
        if config.pretrain in SELF_SUPERVISED:
            head = SELF_SUPERVISED[config.pretrain].head(task.n_normal, config.rep_dim).to(device)
        pretrained = [*model.encoder.parameters(), *head.parameters()] if head is not None else model.parameters()
        ae_optimizer = torch.optim.Adam(pretrained, lr=config.ae_lr, weight_decay=config.weight_decay)
        enc_optimizer = torch.optim.Adam(model.encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        parts = {"model": model, "ae_optimizer": ae_optimizer, "enc_optimizer": enc_optimizer}
        if head is not None:
            parts[SELF_SUPERVISED[config.pretrain].checkpoint_part] = head
        best_epochs = held_out = None
        if config.epoch_choice != "last":
            best_epochs = BestEpochs(model.encoder, RECORD_FIELDS)
            held_out = HeldOutScores(task, config.eta, config.delta)
        data_sha256 = task.content_sha256()  # outlier exposure or another subsample changes the data, not the config
        state = Checkpoint(
            run.checkpoint,
            identity={
                "config": config.training_identity(),
                "classes": task.column_names,
                "training_data": data_sha256,
                "encoder_phase": encoder_phase.__name__,
            },
            parts=parts,
            generator=inputs.generator,
            older_defaults={
                "config": config.stored_defaults(),
                "training_data": data_sha256,
                "encoder_phase": train_encoders.__name__,
            },
        )
        return cls(model, head, ae_optimizer, enc_optimizer, state, best_epochs, held_out)

    def restore(self, run: RunOptions) -> tuple[TrainingLog, torch.Tensor, int, int]:
        """(log, centres, autoencoder epochs done, encoder epochs done) from the checkpoint."""
        restored = self.state.restore(("centres", "log", "ae_epochs_done", "enc_epochs_done"), ("best_epochs",))
        enc_start = restored["enc_epochs_done"]
        if self.best_epochs is not None and "best_epochs" in restored:
            self.best_epochs.load_state_dict(restored["best_epochs"])
        elif self.best_epochs is not None and enc_start > 0:
            raise UserError(f"checkpoint {run.checkpoint} has no per-epoch record; --epoch-choice needs a new run")
        log = TrainingLog.model_validate(restored["log"])
        return log, restored["centres"], restored["ae_epochs_done"], enc_start


def fit_deepmad(
    task: Task, config: DeepMADConfig, run: RunOptions, encoder_phase: PhaseTwo = train_encoders
) -> tuple[Scorer, TrainingLog]:
    """Train the m encoders of ``task`` together (phase 1, centres, phase 2) and return the eval-mode
    scorer on the CPU with its log. ``encoder_phase`` is DeepMAD's contrastive ``train_encoders`` by
    default, or ``deepsvdd.train_one_class_encoders`` for m independent one-class detectors.

    With ``config.epoch_choice`` other than "last", every encoder epoch is scored on held-out photos
    (``epoch_choice.HeldOutScores``) and the best epoch's encoders under that criterion are returned.
    """
    check_criterion(config.epoch_choice, task)
    inputs, device = TrainingInputs.of(task, config.seed, config.input_norm == "contrast"), run.device
    setup = _Setup.of(task, config, run, encoder_phase, inputs)
    model, ae_optimizer, enc_optimizer, state = setup.model, setup.ae_optimizer, setup.enc_optimizer, setup.state
    head, best_epochs, held_out = setup.head, setup.best_epochs, setup.held_out
    log, centres, ae_start, enc_start = setup.restore(run) if run.resume else (TrainingLog(), None, 0, 0)

    def save(ae_done: int, enc_done: int) -> None:
        record = {"best_epochs": best_epochs.state_dict()} if best_epochs is not None else {}
        state.save(centres=centres, log=log.model_dump(), ae_epochs_done=ae_done, enc_epochs_done=enc_done, **record)

    def after_ae_epoch(epoch: int, means: dict[str, float]) -> None:
        log.append(means)
        save(epoch + 1, 0)

    def after_enc_epoch(epoch: int, means: dict[str, float]) -> None:
        log.append(means)
        # The rate so far goes into every checkpoint, so a re-export of a finished run still reports it.
        log.images_per_second["encoders"] = timer.rate((epoch + 1 - enc_start) * len(inputs.images) * task.n_normal)
        if best_epochs is not None and held_out is not None:
            best_epochs.observe(epoch, held_out(Scorer(model.encoder, centres.to(device), normaliser)))
        save(config.ae_epochs, epoch + 1)

    bar = progress_bar(run.progress)
    normaliser = inputs.normaliser.to(device)
    timer = Timer(device)
    phase_one = PhaseOne(
        inputs.class_images, normaliser, config, ae_optimizer, inputs.generator, ae_start, after_ae_epoch, bar
    )
    if head is None:
        pretrain_autoencoders(model, phase_one)
    else:
        SELF_SUPERVISED[config.pretrain].train(model.encoder, head, phase_one)
    steps = -(-max(len(x) for x in inputs.class_images) // config.batch_size)
    seen = (config.ae_epochs - ae_start) * task.n_normal * config.batch_size * steps
    if seen:  # a run resumed after this phase keeps the rate it measured
        log.images_per_second["autoencoders"] = timer.rate(seen)
    if centres is None:
        centres = compute_centres(
            model.encoder,
            inputs.class_images,
            normaliser,
            views=config.centre_views,
            augment=config.augmentation,
            generator=inputs.generator,
        ).cpu()
        save(config.ae_epochs, 0)
    timer = Timer(device)
    encoder_phase(
        EncoderPhase(
            encoder=model.encoder,
            centres=centres,
            images=inputs.images,
            labels=inputs.labels,
            normaliser=normaliser,
            config=config,
            optimizer=enc_optimizer,
            generator=inputs.generator,
            start_epoch=enc_start,
            on_epoch=after_enc_epoch,
            progress=bar,
        )
    )
    if best_epochs is not None:
        chosen = best_epochs.load_best(config.epoch_choice)
        log.epoch_choice = EpochChoice(criterion=config.epoch_choice, **chosen, history=best_epochs.history)
    return Scorer(model.encoder.cpu(), centres, inputs.normaliser).eval(), log
