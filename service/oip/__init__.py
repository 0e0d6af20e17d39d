"""The Open Inference Protocol v2 (KServe / Triton REST) beside the product's own API, on the same model.

Three modules: ``types`` (the protocol's JSON objects and names), ``codec`` (a request's body -> the
photos or images it carries, answers -> the response, JSON or binary) and ``routes`` (the ``/v2``
router). Inference is a codec over the one data plane, ``service.classification.Pipeline``: the same
decode, scoring, metrics and capture as ``/classify``.

Clients the model-serving world already has (tritonclient, KServe's InferenceRESTClient, curl) talk to
the classifier without knowing its JSON. Routes under ``/v2``:

* ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``;
* ``GET /v2/models/{name}[/versions/{version}]`` (model metadata) and ``.../ready``;
* ``POST /v2/models/{name}[/versions/{version}]/infer``.

The model's name and version are the manifest's (``trashnet``, ``1.3.0``). Inputs, exactly one per
request:

* ``photo``, ``BYTES`` [N] (or [N, 1]): encoded photos (JPEG, PNG, ...), decoded by the service's one
  image function with the upload limits (bytes, pixels). In the JSON body each element is the photo
  base64-encoded (JSON strings cannot hold raw bytes); with the binary extension, the raw bytes.
* ``image``, ``UINT8`` [N, H, W, C]: ready model inputs, as the ONNX graph takes them.

N is at most the ``max_batch_items`` setting. Outputs: ``distances`` FP32 [N, k] (one column per
class, in the manifest's order), ``score`` FP32 [N], ``nearest`` INT64 [N], ``nearest_class`` BYTES
[N], ``verdict`` BYTES [N] (``normal`` / ``anomalous``: score >= threshold) and ``id`` BYTES [N] (the
answer's id for ``POST /feedback``: the request's X-Request-ID for one item, a new id per item of a
batch, as ``/classify`` and ``/classify/batch``); the response's ``parameters.threshold`` is the
threshold in use. Photos are offered to the capture writer like ``/classify``'s uploads, and
``parameters.capture_status`` says what became of each (``capture_reason`` when one was dropped).

The binary tensor data extension is supported both ways (tritonclient uses it by default): the
request header ``Inference-Header-Content-Length`` gives the JSON's length, the tensors follow it in
input order, each sized by its ``parameters.binary_data_size`` (BYTES elements as a 4-byte
little-endian length + the bytes). Outputs come back binary when the request asks for it
(``parameters.binary_data_output`` or an output's ``parameters.binary_data``).

Errors are the protocol's ``{"error": "<message>"}``: 400 bad request (datatype, shape, data, corrupt
photo), 404 unknown model or version, 413 over a size limit, 503 no model loaded.
"""
