"""The Open Inference Protocol v2 routes, driven by tritonclient (a client nobody here wrote) against a
real ``python -m service`` on 127.0.0.1: health, metadata, inference with BYTES photos and UINT8 arrays,
binary and JSON tensors, batches, bad inputs; the answers equal ``/classify``'s for the same photos.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from service.imaging import load_image
from service.manifest import Manifest
from tests.service_support import Server, huge_png, model_dir, photo_subset, run_server, wait_for

pytestmark = pytest.mark.slow

MAX_BATCH = 8
MAX_UPLOAD = 2_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(
        model_dir(),
        tmp_path_factory.mktemp("oip"),
        DEEPMAD_MAX_BATCH_ITEMS=str(MAX_BATCH),
        DEEPMAD_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    triton_client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield triton_client
    triton_client.close()


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return Manifest.load(model_dir())


@pytest.fixture(scope="module")
def photos(trashnet_dir: Path) -> list[Path]:
    recyclable, trash = photo_subset(trashnet_dir, per_class=1, trash=2)
    return recyclable + trash  # 7: one of each recyclable class, two trash


@pytest.fixture(scope="module")
def classify_answers(server: Server, photos: list[Path]) -> list[dict]:
    with server.client() as http:
        answers = [
            http.post("/classify", content=p.read_bytes(), headers={"content-type": "image/jpeg"}).json()
            for p in photos
        ]
    assert np.std([a["score"] for a in answers]) > 0, "constant scores: the model is not looking at the image"
    return answers


def photo_input(blobs: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("photo", [len(blobs)], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=binary)
    return tensor


def image_input(images: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def assert_matches_classify(result: triton.InferResult, answers: list[dict], manifest: Manifest) -> None:
    distances, score = result.as_numpy("distances"), result.as_numpy("score")
    nearest, verdict = result.as_numpy("nearest"), result.as_numpy("verdict")
    nearest_class = result.as_numpy("nearest_class")
    assert distances.shape == (len(answers), len(manifest.class_names)) and distances.dtype == np.float32
    assert score.shape == (len(answers),) and nearest.dtype == np.int64
    for i, answer in enumerate(answers):
        assert verdict[i].decode() == answer["verdict"]
        assert nearest_class[i].decode() == answer["nearest_class"]
        assert manifest.class_names[int(nearest[i])] == answer["nearest_class"]
        assert float(score[i]) == pytest.approx(answer["score"], rel=1e-5, abs=1e-6)
        want = [answer["distances"][name] for name in manifest.class_names]
        np.testing.assert_allclose(distances[i], want, rtol=1e-5, atol=1e-6)


def test_health_and_metadata(client: triton.InferenceServerClient, manifest: Manifest) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(manifest.name)
    assert client.is_model_ready(manifest.name, model_version=manifest.version)
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready(manifest.name, model_version="0.0.0")
    server_meta = client.get_server_metadata()
    assert server_meta["name"] == "deepmad-bin" and "binary_tensor_data" in server_meta["extensions"]
    meta = client.get_model_metadata(manifest.name)
    assert meta["name"] == manifest.name and meta["versions"] == [manifest.version]
    inputs = {item["name"]: item for item in meta["inputs"]}
    spec = manifest.input
    assert inputs["photo"] == {"name": "photo", "datatype": "BYTES", "shape": [-1]}
    assert inputs["image"]["datatype"] == "UINT8"
    assert inputs["image"]["shape"] == [-1, spec.height, spec.width, spec.channels]
    outputs = {item["name"]: (item["datatype"], item["shape"]) for item in meta["outputs"]}
    assert outputs == {
        "distances": ("FP32", [-1, len(manifest.class_names)]),
        "score": ("FP32", [-1]),
        "nearest": ("INT64", [-1]),
        "nearest_class": ("BYTES", [-1]),
        "verdict": ("BYTES", [-1]),
        "id": ("BYTES", [-1]),
    }
    assert client.get_model_metadata(manifest.name, model_version=manifest.version) == meta


def test_bytes_batch_binary_equals_classify(
    client: triton.InferenceServerClient, manifest: Manifest, photos: list[Path], classify_answers: list[dict]
) -> None:
    """tritonclient's defaults: binary tensors both ways, all outputs."""
    result = client.infer(manifest.name, [photo_input([p.read_bytes() for p in photos])])
    assert_matches_classify(result, classify_answers, manifest)
    response = result.get_response()
    assert response["model_name"] == manifest.name and response["model_version"] == manifest.version
    assert response["parameters"]["threshold"] == pytest.approx(manifest.threshold.value)
    verdicts = {v.decode() for v in result.as_numpy("verdict")}
    assert verdicts <= {"normal", "anomalous"}
    ids = [value.decode() for value in result.as_numpy("id")]
    assert len(set(ids)) == len(photos), "each item of a batch has its own id (for POST /feedback)"


def test_bytes_as_json_base64_with_named_outputs(
    client: triton.InferenceServerClient, manifest: Manifest, photos: list[Path], classify_answers: list[dict]
) -> None:
    """Pure JSON both ways: photos base64-encoded, outputs asked for by name as JSON."""
    blobs = [base64.b64encode(p.read_bytes()) for p in photos[:3]]
    outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in ("score", "verdict")]
    result = client.infer(manifest.name, [photo_input(blobs, binary=False)], outputs=outputs, request_id="bin-17-0001")
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["score", "verdict"]
    assert all("data" in o for o in response["outputs"]) and response["id"] == "bin-17-0001"
    for i, answer in enumerate(classify_answers[:3]):
        assert result.as_numpy("verdict")[i] in (answer["verdict"], answer["verdict"].encode())
        assert float(result.as_numpy("score")[i]) == pytest.approx(answer["score"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("binary", [True, False])
def test_uint8_batch_equals_classify(
    client: triton.InferenceServerClient,
    manifest: Manifest,
    photos: list[Path],
    classify_answers: list[dict],
    binary: bool,
) -> None:
    """Ready [N, 32, 32, 3] arrays made by the service's image function score like the photos."""
    spec = manifest.input
    images = np.stack([load_image(p.read_bytes(), spec.height, spec.width, spec.channels) for p in photos])
    result = client.infer(manifest.name, [image_input(images, binary)], model_version=manifest.version)
    assert_matches_classify(result, classify_answers, manifest)


def expect_error(call, status: str, *words: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert caught.value.status() == status, caught.value
    message = caught.value.message()
    assert isinstance(message, str) and all(word in message for word in words), message


def test_bad_inputs_get_protocol_errors(
    client: triton.InferenceServerClient, manifest: Manifest, photos: list[Path]
) -> None:
    name, photo = manifest.name, photos[0].read_bytes()
    spec = manifest.input
    # Wrong datatype: photos must be BYTES, images UINT8.
    as_int = triton.InferInput("photo", [1], "INT32")
    as_int.set_data_from_numpy(np.array([7], dtype=np.int32))
    expect_error(lambda: client.infer(name, [as_int]), "400", "BYTES")
    as_float = triton.InferInput("image", [1, spec.height, spec.width, spec.channels], "FP32")
    as_float.set_data_from_numpy(np.zeros((1, spec.height, spec.width, spec.channels), dtype=np.float32))
    expect_error(lambda: client.infer(name, [as_float]), "400", "UINT8")
    # Wrong shape: not the model's H x W.
    small = np.zeros((2, 16, 16, spec.channels), dtype=np.uint8)
    expect_error(lambda: client.infer(name, [image_input(small)]), "400", "shape")
    # Unknown model, unknown version, unknown input, unknown output.
    expect_error(lambda: client.infer("no-such-model", [photo_input([photo])]), "404", "unknown model")
    expect_error(lambda: client.infer(name, [photo_input([photo])], model_version="0.0.0"), "404", "version")
    other = triton.InferInput("pixels", [1], "BYTES")
    other.set_data_from_numpy(np.array([photo], dtype=np.object_))
    expect_error(lambda: client.infer(name, [other]), "400", "unknown input")
    wrong_output = [triton.InferRequestedOutput("logits")]
    expect_error(lambda: client.infer(name, [photo_input([photo])], outputs=wrong_output), "400", "unknown output")
    # A corrupt photo in a batch: the request fails and names the element.
    expect_error(lambda: client.infer(name, [photo_input([photo, b"not a photo"])]), "400", "photo 1")
    truncated = photo[: len(photo) // 2]
    expect_error(lambda: client.infer(name, [photo_input([truncated])]), "400", "photo 0")
    # Limits from the settings: bytes per photo, pixels, items per request.
    expect_error(lambda: client.infer(name, [photo_input([b"\xff" * (MAX_UPLOAD + 1)])]), "413", "limit")
    expect_error(lambda: client.infer(name, [photo_input([huge_png()])]), "413", "pixels")
    expect_error(lambda: client.infer(name, [photo_input([photo] * (MAX_BATCH + 1))]), "413", str(MAX_BATCH))
    # After all of that the server still answers.
    assert client.infer(name, [photo_input([photo])]).as_numpy("score").shape == (1,)


def test_raw_http_error_shape_and_json_body(server: Server, manifest: Manifest, photos: list[Path]) -> None:
    """Without a client library: the protocol's JSON, and {"error": "<message>"} on failure."""
    url = f"/v2/models/{manifest.name}/infer"
    with server.client() as http:
        for body in (b"{not json", b'{"inputs": []}', b'{"inputs": [{"name": "photo"}]}'):
            response = http.post(url, content=body, headers={"content-type": "application/json"})
            assert response.status_code == 400
            assert isinstance(response.json()["error"], str)
        photo = base64.b64encode(photos[0].read_bytes()).decode()
        request = {"inputs": [{"name": "photo", "shape": [1, 1], "datatype": "BYTES", "data": [[photo]]}]}
        response = http.post(url, json=request, headers={"X-Request-ID": "bin-17-0042"})
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        outputs = {o["name"]: o for o in response.json()["outputs"]}
        assert outputs["id"]["data"] == ["bin-17-0042"] and response.headers["x-request-id"] == "bin-17-0042"
        assert outputs["verdict"]["data"][0] in ("normal", "anomalous")
        assert outputs["distances"]["shape"] == [1, len(manifest.class_names)]
        assert http.get("/v2/models/nope").json() == {"error": "unknown model 'nope'; this server serves 'trashnet'"}
        assert http.get("/v2/health/live").status_code == 200
        metrics = http.get("/metrics").text
    assert 'endpoint="/v2/models/{name}/infer",status="200",verdict="normal"' in metrics or (
        'endpoint="/v2/models/{name}/infer",status="200",verdict="anomalous"' in metrics
    )


def test_grey_png_and_request_json_are_parsed_by_the_service_image_function(
    client: triton.InferenceServerClient, manifest: Manifest
) -> None:
    """A grey PNG through BYTES gets the same answer as its RGB twin (the one image function converts)."""
    grey = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1)), mode="L")
    blobs = []
    for image in (grey, grey.convert("RGB")):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    result = client.infer(manifest.name, [photo_input(blobs)])
    score = result.as_numpy("score")
    assert score[0] == score[1]
    assert json.loads(json.dumps(result.get_response()))["outputs"]


def test_photos_sent_over_v2_are_captured_for_labelling(tmp_path: Path, photos: list[Path]) -> None:
    """With capture on, a v2 photo is kept under its answer's id, like a /classify upload."""
    token = "oip-operator-token"
    env = {
        "DEEPMAD_CAPTURE_DIR": str(tmp_path / "captures"),
        "DEEPMAD_CAPTURE_NORMAL_RATE": "1",
        "DEEPMAD_OPERATOR_TOKEN": token,
    }
    photo = photos[0].read_bytes()
    with run_server(model_dir(), tmp_path, **env) as running, running.client() as http:
        client = triton.InferenceServerClient(url=running.url.removeprefix("http://"))
        try:
            result = client.infer("trashnet", [photo_input([photo, photos[1].read_bytes()])])
        finally:
            client.close()
        ids = [value.decode() for value in result.as_numpy("id")]
        auth = {"Authorization": f"Bearer {token}"}
        assert wait_for(lambda: http.get(f"/captures/{ids[0]}/image", headers=auth).status_code == 200)
        assert http.get(f"/captures/{ids[0]}/image", headers=auth).content == photo


CLASSIFY_ROUTE, INFER_ROUTE = "/classify", "/v2/models/{name}/infer"


def counted(http) -> Counter:
    """Every counter and histogram sample on /metrics except timings' values (their counts stay), the
    two inference routes under one name, other routes (the scrapes and polls themselves) left out."""
    out: Counter = Counter()
    for family in text_string_to_metric_families(http.get("/metrics").text):
        if family.type not in ("counter", "histogram"):
            continue
        for sample in family.samples:
            timing = family.name.endswith("_seconds") and not sample.name.endswith("_count")
            labels = dict(sample.labels)
            if (
                sample.name.endswith("_created")
                or timing
                or labels.get("endpoint", INFER_ROUTE)
                not in (
                    CLASSIFY_ROUTE,
                    INFER_ROUTE,
                )
            ):
                continue
            labels.pop("endpoint", None)
            out[(sample.name, tuple(sorted(labels.items())))] += sample.value
    return out


def pending(http) -> float:
    families = text_string_to_metric_families(http.get("/metrics").text)
    return next(s.value for f in families for s in f.samples if s.name == "deepmad_capture_pending")


def test_a_v2_photo_is_captured_and_counted_as_a_classify_upload(tmp_path: Path, photos: list[Path]) -> None:
    """One data plane: the same photo through /classify and through v2 infer leaves the same capture and
    moves every Prometheus counter by the same amounts."""
    token = "oip-operator-token"
    env = {
        "DEEPMAD_CAPTURE_DIR": str(tmp_path / "captures"),
        "DEEPMAD_CAPTURE_NORMAL_RATE": "1",
        "DEEPMAD_OPERATOR_TOKEN": token,
    }
    auth, photo = {"Authorization": f"Bearer {token}"}, photos[-1].read_bytes()
    with run_server(model_dir(), tmp_path, **env) as running, running.client() as http:

        def drained() -> None:
            assert wait_for(lambda: pending(http) == 0), "capture writer did not drain"

        before = counted(http)
        headers = {"content-type": "image/jpeg", "X-Request-ID": "via-classify"}
        answer = http.post("/classify", content=photo, headers=headers).json()
        drained()
        middle = counted(http)
        client = triton.InferenceServerClient(url=running.url.removeprefix("http://"))
        try:
            result = client.infer("trashnet", [photo_input([photo])], headers={"X-Request-ID": "via-oip-0001"})
        finally:
            client.close()
        drained()
        after = counted(http)
        listed = http.get("/captures", headers=auth, params={"limit": 10}).json()["items"]
    assert answer["capture"]["status"] == "queued"
    assert result.get_response()["parameters"]["capture_status"] == "queued"
    by_id = {item["id"]: item for item in listed}
    assert set(by_id) == {"via-classify", "via-oip-0001"}
    same = ("image_sha256", "image_bytes", "model", "score", "threshold", "verdict", "nearest_class", "distances")
    assert {k: by_id["via-classify"][k] for k in same} == {k: by_id["via-oip-0001"][k] for k in same}
    via_classify, via_oip = middle - before, after - middle
    assert via_classify == via_oip
    assert via_oip[("deepmad_captures_total", (("outcome", "written"),))] == 1
    assert sum(v for (name, _), v in via_oip.items() if name == "deepmad_classifications_total") == 1
