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

from training.errors import UserError


def setting(
    default: Any,
    help: str,
    *,
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
        parser.add_argument(
            *flags, dest=dest, type=type(field.default), default=default, choices=choices, help=help_text
        )
