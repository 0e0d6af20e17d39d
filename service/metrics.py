"""Prometheus metrics, one CollectorRegistry per app (tests build many apps in one process)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.drift import ScoreDrift
from service.model import LoadedModel
from service.no_item import REASONS as NO_ITEM_REASONS

PREFIX = "deepmad"
# Seconds: decode of a 32x32 target from a 512x384 JPEG is ~1-3 ms; inference ~0.5 ms per encoder.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# Score / threshold: 1.0 is the decision boundary, whatever the model's distance scale.
RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)
SCORE_BUCKETS = tuple(round(0.001 * 2**i, 6) for i in range(21))  # 0.001 .. ~1049, log spaced

CAPTURE_OUTCOMES = ("written", "queue_full", "budget_full", "duplicate_id", "write_error", "error")

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self, drift_window: int = 500) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests by endpoint (route template), status and verdict",
            ["endpoint", "status", "verdict"],
            registry=r,
        )
        self.classifications = Counter(
            f"{PREFIX}_classifications",
            "Images scored (single and batch), by verdict (normal, anomalous, no_item) and nearest class",
            ["verdict", "nearest_class"],
            registry=r,
        )
        self.no_item = self._counter_from_zero(
            "no_item",
            'Frames answered no_item (no item in them; also in deepmad_classifications_total{verdict="no_item"}), '
            "by what the frame was: overexposed (blinding light), dark (lights off, a covered lens) or featureless "
            "(the empty chamber, a flat colour, noise)",
            "reason",
            NO_ITEM_REASONS,
        )
        self.request_seconds = self._histogram(
            "request_duration_seconds", "Total time handling a request", LATENCY_BUCKETS, ["endpoint"]
        )
        self.decode_seconds = self._histogram(
            "decode_duration_seconds", "Time to decode one image into the model's input", LATENCY_BUCKETS
        )
        self.inference_seconds = self._histogram(
            "inference_duration_seconds", "Time of one ONNX Runtime call (all encoders, whole batch)", LATENCY_BUCKETS
        )
        self.inference_batch_size = self._histogram(
            "inference_batch_size",
            "Images per ONNX Runtime call (above 1: a batch request, or micro-batching under load)",
            (1, 2, 4, 8, 16, 32, 64),
        )
        self.score = self._histogram("score", "Anomaly score of each classified image (model units)", SCORE_BUCKETS)
        self.score_ratio = self._histogram(
            "score_threshold_ratio", "Score divided by the threshold in use (>= 1: anomalous)", RATIO_BUCKETS
        )
        self.model_info = Info(f"{PREFIX}_model", "The model being served", registry=r)
        self.threshold = Gauge(f"{PREFIX}_threshold", "Threshold (gamma) in use", registry=r)
        self.ready = Gauge(f"{PREFIX}_ready", "1 when a model is loaded and warmed up", registry=r)
        self.model_loaded_at = Gauge(
            f"{PREFIX}_model_loaded_timestamp_seconds",
            "Unix time the current model was loaded",
            registry=r,
        )
        self.reloads = Counter(
            f"{PREFIX}_reloads",
            "Successful model reloads, by trigger (http, sighup)",
            ["trigger"],
            registry=r,
        )
        self.reload_failures = Counter(
            f"{PREFIX}_reload_failures",
            "Failed model reloads (the old model kept serving), by trigger",
            ["trigger"],
            registry=r,
        )
        self.golden_mismatches = Counter(
            f"{PREFIX}_model_golden_mismatch",
            "Artifacts refused because this CPU/provider did not reproduce their golden scores, by trigger",
            ["trigger"],
            registry=r,
        )
        for trigger in ("http", "sighup"):
            self.reloads.labels(trigger)
            self.reload_failures.labels(trigger)
        for trigger in ("startup", "http", "sighup"):
            self.golden_mismatches.labels(trigger)
        self.drift = ScoreDrift(drift_window)
        self._add_capture_metrics(r)

    def _counter_from_zero(self, name: str, documentation: str, label: str, values) -> Counter:
        """A counter with one label whose every value is exported from the start (0 until it happens)."""
        counter = Counter(f"{PREFIX}_{name}", documentation, [label], registry=self.registry)
        for value in values:
            counter.labels(value)
        return counter

    def _histogram(self, name: str, documentation: str, buckets, labels: list[str] | None = None) -> Histogram:
        return Histogram(f"{PREFIX}_{name}", documentation, labels or (), buckets=buckets, registry=self.registry)

    def _add_capture_metrics(self, r: CollectorRegistry) -> None:
        """The capture writer's counters and gauges (zero when capture is off)."""
        self.captures = self._counter_from_zero(
            "captures",
            "Photos the capture policy kept, by outcome: written, or dropped (queue_full, budget_full: only "
            "labelled captures left, duplicate_id, write_error, error)",
            "outcome",
            CAPTURE_OUTCOMES,
        )
        self.capture_evictions = Counter(
            f"{PREFIX}_capture_evictions",
            "Unlabelled captures deleted to stay within the capture byte budget",
            registry=r,
        )
        self.capture_bytes = Gauge(f"{PREFIX}_capture_bytes", "Bytes held by captures (images + sidecars)", registry=r)
        self.captures_stored = Gauge(f"{PREFIX}_captures_stored", "Captures in the capture folder", registry=r)
        self.capture_pending = Gauge(
            f"{PREFIX}_capture_pending", "Captures queued or being written by the background writer", registry=r
        )
        self.capture_batch_seconds = self._histogram(
            "capture_batch_seconds",
            "Time the capture writer spent on one batch (sidecars, group commit); its rate is the writer's busy "
            "share, and captures written over its sum the writer's line rate",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )

        # Drift of the recent scores against the manifest's held-out normal quantiles (service/drift.py),
        # computed when Prometheus scrapes.
        drift_gauges = {
            "score_drift_psi": ("Population stability index of the last scores vs held-out normal scores", "psi"),
            "score_drift_ks": ("Kolmogorov-Smirnov distance of the last scores vs held-out normal scores", "ks"),
            "anomalous_share": ("Share of anomalous verdicts among the last scores", "anomalous_share"),
            "drift_window_scores": ("Scores in the drift window (at most the drift_window setting)", "scores"),
        }
        for name, (help_text, field) in drift_gauges.items():
            gauge = Gauge(f"{PREFIX}_{name}", help_text, registry=r)
            gauge.set_function(lambda field=field: float(getattr(self.drift.snapshot(), field)))

    def set_model(self, model: LoadedModel | None) -> None:
        if model is None:
            self.ready.set(0)
            return
        manifest = model.manifest
        self.drift.set_reference(manifest.calibration.normal_score_quantiles if manifest.calibration else None)
        self.model_info.info(
            {
                "name": manifest.name,
                "version": manifest.version,
                "method": manifest.method,
                "sha256": manifest.model_sha256,
                "providers": ",".join(model.providers),
            }
        )
        for name in manifest.class_names:  # every class of this model is a series from the start, a new one too
            for verdict in ("normal", "anomalous"):
                self.classifications.labels(verdict, name)
        self.threshold.set(model.threshold)
        self.ready.set(1)
        self.model_loaded_at.set(time.time())

    def observe_inference(self, seconds: float, images: int) -> None:
        self.inference_seconds.observe(seconds)
        self.inference_batch_size.observe(images)

    def observe_result(
        self, verdict: str, nearest_class: str, score: float, threshold: float, no_item: str | None = None
    ) -> None:
        """Count one answer; a ``no_item`` frame (``no_item`` is its reason) is counted, but its score stays out
        of the score histograms and the drift window, which describe the items the bin sees."""
        self.classifications.labels(verdict, nearest_class).inc()
        if no_item is not None:
            self.no_item.labels(no_item).inc()
            return
        self.score.observe(score)
        self.drift.observe(score, verdict == "anomalous")
        if threshold > 0:
            self.score_ratio.observe(score / threshold)

    def render(self) -> bytes:
        return generate_latest(self.registry)
