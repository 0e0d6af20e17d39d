"""The five methods of the paper, each one ``Method`` object: its configuration, its task and its trainer.

Algorithm 2 methods (deepsvdd, drocc) train one detector on the pooled normal classes; Algorithm 1
methods (deepsvdd-m, drocc-m) train one independent detector per normal class; DeepMAD trains one
encoder per class with the other normal classes as negatives. All return a scorer with the same
exported contract (distances [N, k], score [N], nearest [N]). Adding a method is one entry in
``METHODS``: the CLIs build their choices and flags from it.

Example:
    >>> method = get_method("drocc-m")
    >>> config = method.config({"epochs": 5, "ascent_steps": 5})
    >>> scorer, log = method.fit(task, config, torch.device("cpu"))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.manifest import TrainingLog
from training.data import Task, pool_task
from training.engine import RunOptions
from training.errors import UserError
from training.methods.backbone import fit_backbone
from training.methods.config import MethodConfig
from training.methods.deepmad import DeepMADConfig, fit_deepmad
from training.methods.deepsvdd import fit_deepsvdd
from training.methods.drocc import DROCCConfig, fit_drocc
from training.scorer import BaseScorer

Trainer = Callable[[Task, Any, RunOptions], tuple[BaseScorer, TrainingLog]]


@dataclass(frozen=True)
class Method:
    name: str
    config_type: type[MethodConfig]
    trainer: Trainer
    pooled: bool  # Algorithm 2: one detector on all normal classes
    description: str

    def config(self, values: Mapping[str, Any]) -> Any:
        """The method's defaults (paper tables 18-20) with the values that apply to it (others ignored)."""
        return self.config_type.from_values(values)

    def prepare(self, task: Task) -> Task:
        return pool_task(task) if self.pooled and not task.pooled else task

    def fit(
        self,
        task: Task,
        config: MethodConfig,
        device: torch.device,
        checkpoint: Path | None = None,
        resume: bool = False,
        progress: bool = False,
    ) -> tuple[BaseScorer, TrainingLog]:
        """Train on ``task`` (pooled here when the method is) and return the CPU scorer and its log."""
        return self.trainer(self.prepare(task), config, RunOptions(device, checkpoint, resume, progress))


def on_encoders(scratch: Trainer, one_class: bool) -> Trainer:
    """A centre method's trainer: from-scratch LeNet encoders, or heads on a pretrained backbone (``--backbone``)."""

    def trainer(task: Task, config: DeepMADConfig, run: RunOptions) -> tuple[BaseScorer, TrainingLog]:
        if config.backbone != "none":
            return fit_backbone(task, config, run, one_class)
        return scratch(task, config, run)

    trainer.__name__ = scratch.__name__
    return trainer


METHODS = {
    m.name: m
    for m in [
        Method(
            "deepmad",
            DeepMADConfig,
            on_encoders(fit_deepmad, one_class=False),
            False,
            "one encoder per normal class, others as negatives",
        ),
        Method(
            "deepsvdd",
            DeepMADConfig,
            on_encoders(fit_deepsvdd, one_class=True),
            True,
            "one DeepSVDD on the normal classes pooled (Alg. 2)",
        ),
        Method(
            "deepsvdd-m",
            DeepMADConfig,
            on_encoders(fit_deepsvdd, one_class=True),
            False,
            "one DeepSVDD per normal class (Alg. 1)",
        ),
        Method("drocc", DROCCConfig, fit_drocc, True, "one DROCC on the normal classes pooled (Alg. 2)"),
        Method("drocc-m", DROCCConfig, fit_drocc, False, "one DROCC per normal class (Alg. 1)"),
    ]
}
CONFIG_TYPES = list(dict.fromkeys(m.config_type for m in METHODS.values()))


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def parse_methods(spec: str) -> list[Method]:
    methods = [get_method(n.strip()) for n in spec.split(",") if n.strip()]
    if not methods:
        raise UserError("no method given")
    return methods
