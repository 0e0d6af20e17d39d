"""The naive baseline: the service as a user would first write it. Lives in bench/ only; never shipped.

FastAPI's UploadFile tutorial shape: an ``async def`` route, ``await file.read()``, Pillow decodes the
whole photo (no draft mode), ``.convert("RGB").resize((32, 32))``, torch eager on the same weights as
the shipped ONNX graph, ``float()``/``int()`` into a dict. Run it with
``DEEPMAD_MODEL_DIR=models/trashnet uvicorn bench.naive_service:app``.

The shipped artifact holds only ONNX, so ``scorer_from_onnx`` rebuilds the torch ``Scorer``
(``training.scorer``) from the graph's initializers: the exporter folded each eval-mode BatchNorm into
the preceding grouped convolution (weight scaled, a bias added), so the torch conv takes the folded
weight and its BatchNorm is set to add the bias back (running_mean = -bias, running_var = 1 - eps).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from fastapi import FastAPI, UploadFile
from onnx import numpy_helper
from PIL import Image

from training.batches import Normaliser
from training.networks import BN_EPS, GroupedEncoder
from training.scorer import Scorer


def scorer_from_onnx(model_dir: str | Path) -> tuple[Scorer, dict]:
    """The torch Scorer with exactly the weights of ``model_dir/model.onnx``, and its manifest."""
    model_dir = Path(model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    graph = onnx.load(str(model_dir / "model.onnx")).graph
    weights = {item.name: torch.from_numpy(numpy_helper.to_array(item).copy()) for item in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    # The last Sub is embeddings - centres [1, m, rep_dim]; the first is the standardisation's - mean.
    centres = weights[[n for n in graph.node if n.op_type == "Sub"][-1].input[1]]
    spec = manifest["input"]
    groups, rep_dim = centres.shape[-2], centres.shape[-1]
    encoder = GroupedEncoder(groups, spec["channels"], spec["height"], rep_dim)
    layers = [m for m in encoder.features if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in encoder.features if isinstance(m, torch.nn.BatchNorm2d)]
    if len(convs) != len(layers) + 1:
        raise ValueError(f"expected {len(layers) + 1} Conv nodes in the graph, found {len(convs)}")
    with torch.no_grad():
        for node, conv, norm in zip(convs[:-1], layers, norms, strict=True):
            conv.weight.copy_(weights[node.input[1]])
            norm.running_mean.copy_(-weights[node.input[2]])
            norm.running_var.fill_(1.0 - BN_EPS)
        encoder.dense.weight.copy_(weights[convs[-1].input[1]])
    normaliser = Normaliser(weights["mean"].flatten(), weights["std"].flatten())
    return Scorer(encoder, centres.reshape(groups, rep_dim), normaliser).eval(), manifest


MODEL_DIR = os.environ.get("DEEPMAD_MODEL_DIR", str(Path(__file__).resolve().parents[1] / "models" / "trashnet"))
model, manifest = scorer_from_onnx(MODEL_DIR)
class_names = manifest["class_names"]
threshold = manifest["threshold"]["value"]
size = (manifest["input"]["width"], manifest["input"]["height"])

app = FastAPI(title="naive baseline")


@app.post("/classify")
async def classify(file: UploadFile):
    data = await file.read()
    image = Image.open(io.BytesIO(data)).convert("RGB").resize(size)
    batch = torch.from_numpy(np.array(image)).unsqueeze(0)
    with torch.no_grad():
        distances, score, nearest = model(batch)
    return {
        "verdict": "anomalous" if float(score[0]) >= threshold else "normal",
        "score": float(score[0]),
        "threshold": threshold,
        "nearest_class": class_names[int(nearest[0])],
        "distances": {name: float(d) for name, d in zip(class_names, distances[0], strict=True)},
    }


@app.get("/healthz")
async def healthz():
    return {"status": "ok"}
