"""The bound, not a peer: the least work any Python HTTP server can do per classification.

A raw ASGI callable on uvicorn (httptools, uvloop) with no framework, no routing, no validation, no
metrics and no thread hand-off: it reads the body, takes the multipart ``file`` part with the
service's single-part reader, decodes with the service's image function and runs one ONNX Runtime
call (one intra-op thread, the cheapest CPU per image) on the event loop itself, then writes the same
JSON answer as the peers. Nobody would ship it (one slow image stalls every connection, a bad body is
a bare 400), which is why ``bench.serve`` prints it as a reference column and never picks it as the
best peer: its server CPU per request is what decode + graph + HTTP cost with nothing else, so a
throughput target above (peer's CPU per request) / (this one's) cannot be met by any server design.
Run it with ``uvicorn bench.peers.bare_asgi:app`` (``DEEPMAD_MODEL_DIR`` picks the model).
"""

from __future__ import annotations

import json

import onnxruntime as ort

from bench.peers.answer import MODEL_DIR, answer, served
from service.imaging import load_image
from service.uploads import one_file_part

manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(str(MODEL_DIR / "model.onnx"), options, providers=["CPUExecutionProvider"])
class_names, threshold, spec = served(manifest)


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await receive()  # lifespan.startup: the session is already open
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    status, body = 200, b'{"status":"ok"}'
    if scope["path"] == "/classify":
        headers = dict(scope["headers"])
        part = one_file_part(headers.get(b"content-type", b"").decode("latin-1"), b"".join(chunks))
        if part is None:
            status, body = 400, b'{"error":"send one multipart field named file"}'
        else:
            image = load_image(part[2], spec["height"], spec["width"], spec["channels"])
            distances, score, nearest = session.run(["distances", "score", "nearest"], {"image": image[None]})
            body = json.dumps(answer(distances[0], score[0], nearest[0], class_names, threshold)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
