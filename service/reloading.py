"""Reloading the model folder (``POST /admin/reload`` and SIGHUP): counted, logged, never fatal.

A failed reload leaves the previous model serving (``Classifier.load`` swaps only on success); that
includes an artifact whose golden scores this CPU does not reproduce (also counted on its own), and one that the
configured engine (``DEEPMAD_ENGINE``) refuses or cannot run because it is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import anyio

from service.metrics import Metrics
from service.model import Classifier, GoldenMismatchError, LoadedModel, ModelLoadError

log = logging.getLogger("service")


class Reloader:
    def __init__(self, classifier: Classifier, metrics: Metrics):
        self.classifier, self.metrics = classifier, metrics
        self._tasks: set[asyncio.Task[None]] = set()  # SIGHUP reloads in flight (a task needs a reference)

    async def reload(self, trigger: str) -> tuple[LoadedModel | None, LoadedModel]:
        """Load the folder again; returns (previous, new) or raises ModelLoadError (old model kept)."""
        previous = self.classifier.model
        try:
            model = await anyio.to_thread.run_sync(self.classifier.load)
        except ModelLoadError as exc:
            self.metrics.reload_failures.labels(trigger).inc()
            if isinstance(exc, GoldenMismatchError):
                self.metrics.golden_mismatches.labels(trigger).inc()
            log.error("reload (%s) failed, still serving %s: %s", trigger, describe(previous), exc)
            raise
        self.metrics.reloads.labels(trigger).inc()
        self.metrics.set_model(model)
        log.info("reload (%s): now serving %s", trigger, describe(model))
        return previous, model

    def on_sighup(self) -> None:
        """Signal handler (runs on the event loop): schedule a reload whose failure is only logged."""
        task = asyncio.get_running_loop().create_task(self._reload_quietly("sighup"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_quietly(self, trigger: str) -> None:
        with contextlib.suppress(ModelLoadError):  # logged and counted in reload()
            await self.reload(trigger)


def describe(model: LoadedModel | None) -> str:
    return f"{model.manifest.name} {model.manifest.version}" if model else "no model"
