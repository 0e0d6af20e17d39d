"""FastAPI + torch eager on the shipped weights: the training code served as is, written fairly.

FastAPI's ``UploadFile`` shape with a sync ``def`` route (run in FastAPI's thread pool, so a forward
pass never blocks the event loop), the service's image function for decoding, torch eager under
``torch.inference_mode()`` on the same weights as the shipped ONNX graph, a dict for the answer.
torch runs one intra-op thread per request: concurrent requests already fill the cores from the
thread pool, and each forward pass spawning one thread per core on top of that oversubscribes them
(PyTorch's CPU threading notes). Run it with
``DEEPMAD_MODEL_DIR=models/trashnet uvicorn bench.peers.torch_fastapi:app``.

The shipped artifact holds only ONNX, so ``scorer_from_onnx`` rebuilds the torch ``Scorer``
(``training.scorer``) from the graph's initializers: the exporter folded each eval-mode BatchNorm into
the preceding grouped convolution (weight scaled, a bias added), so the torch conv takes the folded
weight and its BatchNorm is set to add the bias back (running_mean = -bias, running_var = 1 - eps).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch
from fastapi import FastAPI, UploadFile
from onnx import numpy_helper

from bench.peers.answer import MODEL_DIR, answer, served
from service.imaging import load_image
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


torch.set_num_threads(1)
model, manifest = scorer_from_onnx(MODEL_DIR)
class_names, threshold, spec = served(manifest)

app = FastAPI(title="FastAPI + torch peer")


@app.post("/classify")
def classify(file: UploadFile):
    image = load_image(file.file.read(), spec["height"], spec["width"], spec["channels"])
    with torch.inference_mode():
        distances, score, nearest = model(torch.from_numpy(image).unsqueeze(0))
    return answer(distances[0], score[0], nearest[0], class_names, threshold)


@app.get("/healthz")
def healthz():
    return {"status": "ok"}
