"""Plain FastAPI + ONNX Runtime: what a competent engineer writes in an afternoon.

FastAPI's ``UploadFile`` shape with a sync ``def`` route (FastAPI runs it in its thread pool, so the
event loop never blocks), one ``InferenceSession`` with ONNX Runtime's default options, the service's
image function for decoding, a dict for the answer. Run it with
``DEEPMAD_MODEL_DIR=models/trashnet uvicorn bench.peers.fastapi_ort:app``.
"""

from __future__ import annotations

import json

import onnxruntime as ort
from fastapi import FastAPI, UploadFile

from bench.peers.answer import MODEL_DIR, answer, served
from service.imaging import load_image

manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
session = ort.InferenceSession(str(MODEL_DIR / "model.onnx"), providers=["CPUExecutionProvider"])
class_names, threshold, spec = served(manifest)

app = FastAPI(title="FastAPI + ONNX Runtime peer")


@app.post("/classify")
def classify(file: UploadFile):
    image = load_image(file.file.read(), spec["height"], spec["width"], spec["channels"])
    distances, score, nearest = session.run(["distances", "score", "nearest"], {"image": image[None]})
    return answer(distances[0], score[0], nearest[0], class_names, threshold)


@app.get("/healthz")
def healthz():
    return {"status": "ok"}
