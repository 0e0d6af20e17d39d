"""LitServe with its batching on, around the same ONNX Runtime graph.

A ``LitAPI`` as LitServe's documentation shows: ``setup`` opens the session once per worker,
``decode_request`` turns the multipart form (LitServe parses it for an unannotated ``request``) into
the model's input with the service's image function, ``batch`` stacks the inputs of up to
``max_batch_size`` requests that arrived within ``batch_timeout`` seconds, ``predict`` runs one ONNX
Runtime call on the stack, ``unbatch`` splits it, ``encode_response`` makes the answer. LitServe
runs the API in a worker process behind its own FastAPI/uvicorn front end. Run it with
``python -m bench.peers.litserve_ort --port 8000`` (``DEEPMAD_MODEL_DIR`` picks the model).
"""

from __future__ import annotations

import argparse
import json
import sys

import litserve as ls
import numpy as np
import onnxruntime as ort

from bench.peers.answer import MODEL_DIR, answer, served
from service.imaging import load_image
from training.errors import require_artifact, run_command

MAX_BATCH_SIZE = 16
BATCH_TIMEOUT_S = 0.005


class TrashnetAPI(ls.LitAPI):
    def setup(self, device):
        manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
        self.session = ort.InferenceSession(str(MODEL_DIR / "model.onnx"), providers=["CPUExecutionProvider"])
        self.class_names, self.threshold, self.spec = served(manifest)

    def decode_request(self, request):
        spec = self.spec
        return load_image(request["file"].file.read(), spec["height"], spec["width"], spec["channels"])

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, batch):
        return self.session.run(["distances", "score", "nearest"], {"image": batch})

    def unbatch(self, output):
        distances, score, nearest = output
        return list(zip(distances, score, nearest, strict=True))

    def encode_response(self, output):
        distances, score, nearest = output
        return answer(distances, score, nearest, self.class_names, self.threshold)


def main() -> int:
    """A missing model is one ``error:`` line and exit 2, before LitServe starts its workers."""
    return run_command(_main, "bench.peers.litserve_ort: interrupted")


def _main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.litserve_ort", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    require_artifact("DEEPMAD_MODEL_DIR", MODEL_DIR)
    api = TrashnetAPI(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S, api_path="/classify")
    server = ls.LitServer(api, accelerator="cpu")
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
