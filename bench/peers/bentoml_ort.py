"""BentoML with a batchable API (adaptive batching), around the same ONNX Runtime graph.

A ``@bentoml.service`` class as BentoML's documentation shows: the session opens in ``__init__``, and
``classify`` is ``@bentoml.api(batchable=True)``: it takes a list of images and returns a list of
answers, and BentoML's adaptive batching dispatcher merges concurrent requests into one call (at most
``max_batch_size`` images; ``max_latency_ms`` keeps BentoML's default of 60 s: a tighter budget makes
the dispatcher answer 503 to requests it predicts would miss it, which a closed-loop load turns into
errors instead of throughput). The upload arrives as a lazily opened
PIL image (multipart field ``file``); the service's image function applies draft mode, orientation
and the resize exactly as our service does. One request's answer is a JSON list with one object.
Run it with ``bentoml serve bench.peers.bentoml_ort:TrashnetClassifier --host 127.0.0.1 --port 8000``.
"""

from __future__ import annotations

import json

import bentoml
import numpy as np
import onnxruntime as ort
from PIL.Image import Image

from bench.peers.answer import MODEL_DIR, answer, served
from service.imaging import to_model_input


@bentoml.service(workers=1)
class TrashnetClassifier:
    def __init__(self) -> None:
        manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
        self.session = ort.InferenceSession(str(MODEL_DIR / "model.onnx"), providers=["CPUExecutionProvider"])
        self.class_names, self.threshold, self.spec = served(manifest)

    @bentoml.api(batchable=True, max_batch_size=16)
    def classify(self, file: list[Image]) -> list[dict]:
        spec = self.spec
        batch = np.stack([to_model_input(image, spec["height"], spec["width"], spec["channels"]) for image in file])
        distances, score, nearest = self.session.run(["distances", "score", "nearest"], {"image": batch})
        return [
            answer(row, value, index, self.class_names, self.threshold)
            for row, value, index in zip(distances, score, nearest, strict=True)
        ]
