"""The five methods of the paper by name, each as (task transform, configuration, trainer).

Algorithm 2 methods (deepsvdd, drocc) train one detector on the pooled normal classes; Algorithm 1
methods (deepsvdd-m, drocc-m) train one independent detector per normal class; DeepMAD trains one
encoder per class with the other normal classes as negatives. All return a scorer with the same
exported contract (distances [N, k], score [N], nearest [N]).

Example:
    >>> config = make_config("drocc-m", {"epochs": 5, "ascent_steps": 5})
    >>> scorer, log = fit_method("drocc-m", task, config, torch.device("cpu"))
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from training.data import Task, pool_task
from training.engine import fit_deepmad
from training.errors import UserError
from training.methods.deepmad import DeepMADConfig, train_encoders
from training.methods.deepsvdd import train_one_class_encoders
from training.methods.drocc import DROCCConfig, fit_drocc
from training.scorer import BaseScorer


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "deepmad", "deepsvdd" or "drocc": which trainer and configuration
    pooled: bool  # Algorithm 2: one detector on all normal classes
    description: str


METHODS = {
    m.name: m
    for m in [
        Method("deepmad", "deepmad", False, "one encoder per normal class, other normal classes as negatives"),
        Method("deepsvdd", "deepsvdd", True, "one DeepSVDD on all normal classes pooled (Algorithm 2)"),
        Method("deepsvdd-m", "deepsvdd", False, "one DeepSVDD per normal class (Algorithm 1)"),
        Method("drocc", "drocc", True, "one DROCC on all normal classes pooled (Algorithm 2)"),
        Method("drocc-m", "drocc", False, "one DROCC per normal class (Algorithm 1)"),
    ]
}
# DeepSVDD shares DeepMAD's configuration: eta and delta are unused without negatives.
CONFIGS = {"deepmad": DeepMADConfig, "deepsvdd": DeepMADConfig, "drocc": DROCCConfig}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def parse_methods(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        get_method(name)
    if not names:
        raise UserError("no method given")
    return names


def make_config(name: str, overrides: dict) -> DeepMADConfig | DROCCConfig:
    """The method's defaults (paper tables 18-20) with the overrides that apply to it (others ignored)."""
    config_type = CONFIGS[get_method(name).family]
    fields = {f.name for f in dataclasses.fields(config_type)}
    return config_type(**{k: v for k, v in overrides.items() if k in fields and v is not None})


def prepare_task(name: str, task: Task) -> Task:
    return pool_task(task) if get_method(name).pooled else task


def progress_bar(enabled: bool):
    if not enabled:
        return None
    return lambda iterable, desc: tqdm(iterable, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def fit_method(
    name: str,
    task: Task,
    config: DeepMADConfig | DROCCConfig,
    device: torch.device,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = False,
) -> tuple[BaseScorer, dict]:
    """Train ``name`` on ``task`` (pooled here when the method is) and return the CPU scorer and its log."""
    method = get_method(name)
    task = prepare_task(name, task) if not task.pooled else task
    if method.family == "drocc":
        return fit_drocc(task, config, device, checkpoint, resume, progress_bar(progress))
    phase = train_encoders if method.family == "deepmad" else train_one_class_encoders
    scorer, log = fit_deepmad(task, config, device, checkpoint, resume, progress, encoder_phase=phase)
    return scorer, dict(log.__dict__)
