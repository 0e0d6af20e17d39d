"""The HTTP API through TestClient on the shipped model and real TrashNet photos."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.manifest import Manifest, write_manifest
from service.model import ModelLoadError
from service.settings import Settings
from tests.service_support import (
    animated_gif,
    binomial_cdf,
    binomial_sf,
    copy_model,
    corrupt_model,
    huge_png,
    photo_subset,
    service_env,
    without_id,
)

TOKEN = "test-admin-token"


@pytest.fixture(scope="module")
def client(model: Path):
    with TestClient(create_app(Settings(model_dir=model, admin_token=TOKEN))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def photo_bytes(trashnet_dir: Path) -> bytes:
    return (trashnet_dir / "plastic" / "plastic1.jpg").read_bytes()


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(client: TestClient, name: str, **labels: str) -> float:
    return metric_samples(client.get("/metrics").text).get((name, tuple(sorted(labels.items()))), 0.0)


# ---- the happy path ----


def test_classify_multipart_and_raw_agree(client: TestClient, manifest: Manifest, photo_bytes: bytes) -> None:
    multipart = client.post("/classify", files={"file": ("plastic1.jpg", photo_bytes, "image/jpeg")})
    raw = client.post("/classify", content=photo_bytes, headers={"content-type": "image/jpeg"})
    assert multipart.status_code == raw.status_code == 200
    body = multipart.json()
    assert without_id(body) == without_id(raw.json()) and body["id"] != raw.json()["id"]
    keys = {"id", "verdict", "score", "score_rule", "threshold", "probability", "nearest_class", "distances", "model"}
    assert set(body) == keys | {"capture"} and body["capture"] == {"status": "off"}
    assert body["score_rule"] == manifest.score.rule == "min_distance"
    assert multipart.headers["x-request-id"] == body["id"]
    assert list(body["distances"]) == manifest.class_names
    assert body["score"] == pytest.approx(min(body["distances"].values()), rel=1e-5)
    assert body["nearest_class"] == min(body["distances"], key=body["distances"].get)
    assert body["threshold"] == pytest.approx(manifest.threshold.value)
    assert body["verdict"] == ("anomalous" if body["score"] >= body["threshold"] else "normal")
    assert body["model"] == {"name": manifest.name, "version": manifest.version}
    if manifest.calibration is not None:
        assert body["probability"] == pytest.approx(manifest.calibration.probability(body["score"]))
        assert (body["probability"] >= 0.5) == (body["verdict"] == "anomalous")


def test_rates_on_real_photos_match_manifest(client: TestClient, manifest: Manifest, trashnet_dir: Path) -> None:
    """Recyclables mostly normal, trash flagged, at the rates the manifest's test metrics predict.

    Without outlier exposure no trash is trained on, so its flag rate estimates the manifest's TPR
    (two-sided binomial test); a model trained with outlier exposure saw some of these trash photos as
    negatives, which can only raise their flag rate, so then only the lower side is tested. Likewise the
    recyclable subset mixes training and held-out photos, and training photos score lower, so for them
    only the upper side is tested against the manifest's FPR. Alpha 0.001 each.
    """
    recyclable, trash = photo_subset(trashnet_dir, per_class=12, trash=40)
    flags: dict[str, list[bool]] = {"recyclable": [], "trash": []}
    scores: list[float] = []
    for group, paths in (("recyclable", recyclable), ("trash", trash)):
        for path in paths:
            response = client.post("/classify", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
            assert response.status_code == 200, response.text
            flags[group].append(response.json()["verdict"] == "anomalous")
            scores.append(response.json()["score"])
    assert np.std(scores) > 0, "constant scores: the model is not looking at the image"
    metrics = manifest.test_metrics
    n_normal, flagged_normal = len(flags["recyclable"]), sum(flags["recyclable"])
    n_trash, flagged_trash = len(flags["trash"]), sum(flags["trash"])
    fpr, tpr = metrics.fpr_at_threshold, metrics.tpr_at_threshold
    assert fpr is not None and tpr is not None
    assert flagged_normal / n_normal < 0.5, "recyclables should mostly be normal"
    assert binomial_sf(flagged_normal, n_normal, fpr) > 1e-3, (
        f"{flagged_normal}/{n_normal} recyclables flagged; the manifest's FPR is {fpr:.3f}"
    )
    trash_trained_on = bool(metrics.extra.get("outlier_exposure"))
    assert binomial_cdf(flagged_trash, n_trash, tpr) > 5e-4, f"{flagged_trash}/{n_trash} trash flagged; TPR {tpr:.3f}"
    assert trash_trained_on or binomial_sf(flagged_trash, n_trash, tpr) > 5e-4, (
        f"{flagged_trash}/{n_trash} trash flagged; the manifest's TPR is {tpr:.3f}"
    )
    assert flagged_trash / n_trash > flagged_normal / n_normal, "trash should be flagged more often"


def test_batch_has_per_item_results_and_errors(client: TestClient, photo_bytes: bytes, trashnet_dir: Path) -> None:
    other = (trashnet_dir / "trash" / "trash1.jpg").read_bytes()
    files = [
        ("files", ("a.jpg", photo_bytes, "image/jpeg")),
        ("files", ("bad.jpg", b"not an image", "image/jpeg")),
        ("files", ("b.jpg", other, "image/jpeg")),
        ("files", ("notes.txt", b"hello", "text/plain")),
    ]
    response = client.post("/classify/batch", files=files)
    assert response.status_code == 200
    items = response.json()["results"]
    assert [item["status"] for item in items] == [200, 400, 200, 415]
    assert [item["filename"] for item in items] == ["a.jpg", "bad.jpg", "b.jpg", "notes.txt"]
    assert items[1]["error"]["code"] == "not_an_image" and items[1]["result"] is None
    single = client.post("/classify", content=photo_bytes, headers={"content-type": "image/jpeg"}).json()
    assert items[0]["result"]["verdict"] == single["verdict"]
    assert items[0]["result"]["score"] == pytest.approx(single["score"], rel=1e-5, abs=1e-6)


def test_batch_limits(model: Path, photo_bytes: bytes) -> None:
    with TestClient(create_app(Settings(model_dir=model, max_batch_items=2))) as client:
        files = [("files", (f"{i}.jpg", photo_bytes, "image/jpeg")) for i in range(3)]
        response = client.post("/classify/batch", files=files)
        assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_files"
        assert client.post("/classify/batch", data={"x": "1"}, files={"other": ("a", b"a")}).status_code == 422


# ---- every bad input gets its 4xx and a JSON error ----


@pytest.fixture(scope="module")
def bad_inputs(photo_bytes: bytes) -> dict[str, tuple[dict, int, str]]:
    def part(data: bytes, content_type: str = "image/jpeg", name: str = "x.jpg") -> dict:
        return {"files": {"file": (name, data, content_type)}}

    def raw(data: bytes, content_type: str) -> dict:
        return {"content": data, "headers": {"content-type": content_type}}

    return {
        "zero bytes (multipart)": (part(b""), 400, "empty_body"),
        "zero bytes (raw)": (raw(b"", "image/jpeg"), 400, "empty_body"),
        "text as image": (part(b"just some text, not a photo\n" * 10), 400, "not_an_image"),
        "truncated JPEG": (part(photo_bytes[: len(photo_bytes) // 2]), 400, "truncated_image"),
        "20000x20000 PNG": (part(huge_png(), "image/png", "huge.png"), 413, "too_many_pixels"),
        "20000x20000 PNG (raw)": (raw(huge_png(), "image/png"), 413, "too_many_pixels"),
        "animated GIF": (part(animated_gif(), "image/gif", "a.gif"), 415, "animated_image"),
        "wrong content type (raw text/plain)": (raw(photo_bytes, "text/plain"), 415, "unsupported_media_type"),
        "wrong content type (JSON)": (raw(b'{"file": 1}', "application/json"), 415, "unsupported_media_type"),
        "wrong part content type": (part(b"hello", "text/plain", "a.txt"), 415, "unsupported_media_type"),
        "no content type": ({"content": photo_bytes}, 415, "unsupported_media_type"),
        "missing field": ({"files": {"photo": ("x.jpg", photo_bytes, "image/jpeg")}}, 422, "missing_field"),
        "field is text": ({"files": {"other": ("x", b"x")}, "data": {"file": "abc"}}, 422, "invalid_form"),
        "bad multipart": (raw(b"--xx\r\ngarbage", "multipart/form-data"), 422, "invalid_form"),
        "11 MB body (raw)": (raw(b"\xff" * (11 << 20), "image/jpeg"), 413, "too_large"),
        "11 MB file (multipart)": (part(b"\xff" * (11 << 20)), 413, "too_large"),
    }


BAD_INPUT_NAMES = [
    "zero bytes (multipart)", "zero bytes (raw)", "text as image", "truncated JPEG", "20000x20000 PNG",
    "20000x20000 PNG (raw)", "animated GIF", "wrong content type (raw text/plain)", "wrong content type (JSON)",
    "wrong part content type", "no content type", "missing field", "field is text", "bad multipart",
    "11 MB body (raw)", "11 MB file (multipart)",
]  # fmt: skip


@pytest.mark.parametrize("name", BAD_INPUT_NAMES)
def test_bad_input_gets_its_4xx(client: TestClient, bad_inputs: dict, name: str) -> None:
    kwargs, status, code = bad_inputs[name]
    response = client.post("/classify", **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]


def test_bad_input_table_covers_names(bad_inputs: dict) -> None:
    assert sorted(bad_inputs) == sorted(BAD_INPUT_NAMES)


def test_other_errors_have_the_same_shape(client: TestClient) -> None:
    for response, status in ((client.get("/nope"), 404), (client.get("/classify"), 405)):
        assert response.status_code == status
        assert set(response.json()["error"]) == {"code", "message"}


def test_openapi_documents_errors(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    classify = spec["paths"]["/classify"]["post"]
    assert {"200", "400", "413", "415", "422", "503"} <= set(classify["responses"])
    assert {"multipart/form-data", "image/jpeg", "image/png"} <= set(classify["requestBody"]["content"])
    error_ref = classify["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
    assert error_ref.endswith("/ErrorBody")
    answers = {path: spec["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
               for path in ("/classify", "/classify/batch")}  # fmt: skip
    assert answers == {  # the direct routes skip FastAPI's handler, not its documentation
        "/classify": {"$ref": "#/components/schemas/Classification"},
        "/classify/batch": {"$ref": "#/components/schemas/BatchResponse"},
    }
    assert {"401", "403"} <= set(spec["paths"]["/admin/reload"]["post"]["responses"])


# ---- operations ----


def test_health_ready_model(client: TestClient, manifest: Manifest) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    info = client.get("/model").json()
    assert info["name"] == manifest.name and info["class_names"] == manifest.class_names
    assert info["model_sha256"] == manifest.model_sha256 and info["threshold_source"] == "manifest"
    assert "root" not in info["training_data"]  # no server paths leak
    assert "CPUExecutionProvider" in info["providers"]
    assert "<html" in client.get("/").text.lower()


def test_threshold_override(model: Path, photo_bytes: bytes) -> None:
    with TestClient(create_app(Settings(model_dir=model, threshold=0.0))) as client:
        body = client.post("/classify", content=photo_bytes, headers={"content-type": "image/png"}).json()
        assert body["threshold"] == 0.0 and body["verdict"] == "anomalous"
        assert client.get("/model").json()["threshold_source"] == "override"


def test_metrics_parse_with_prometheus_parser(client: TestClient, photo_bytes: bytes, manifest: Manifest) -> None:
    before = sample(client, "deepmad_requests_total", endpoint="/classify", status="400", verdict="none")
    verdict = client.post("/classify", content=photo_bytes, headers={"content-type": "image/jpeg"}).json()["verdict"]
    client.post("/classify", content=b"", headers={"content-type": "image/jpeg"})
    text = client.get("/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name in (
        "deepmad_requests", "deepmad_classifications", "deepmad_request_duration_seconds",
        "deepmad_decode_duration_seconds", "deepmad_inference_duration_seconds", "deepmad_score",
        "deepmad_score_threshold_ratio", "deepmad_model_info", "deepmad_reloads", "deepmad_reload_failures",
    ):  # fmt: skip
        assert name in families, name
    samples = metric_samples(text)
    key = ("deepmad_requests_total", (("endpoint", "/classify"), ("status", "200"), ("verdict", verdict)))
    assert samples[key] >= 1
    after = sample(client, "deepmad_requests_total", endpoint="/classify", status="400", verdict="none")
    assert after == before + 1
    info = next(s for s in families["deepmad_model_info"].samples if s.name == "deepmad_model_info")
    assert info.labels["name"] == manifest.name and info.labels["version"] == manifest.version
    assert info.labels["method"] == manifest.method
    assert samples[("deepmad_decode_duration_seconds_count", ())] >= 1
    assert samples[("deepmad_inference_duration_seconds_count", ())] >= 1
    assert samples[("deepmad_ready", ())] == 1


# ---- hot reload ----


def test_admin_reload_needs_token(client: TestClient, model: Path) -> None:
    assert client.post("/admin/reload").status_code == 401
    assert client.post("/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.post("/admin/reload", headers={"X-Admin-Token": TOKEN})
    assert ok.status_code == 200 and ok.json()["status"] == "reloaded"
    with TestClient(create_app(Settings(model_dir=model))) as no_admin:
        response = no_admin.post("/admin/reload", headers={"X-Admin-Token": "anything"})
        assert response.status_code == 403 and response.json()["error"]["code"] == "admin_disabled"


def test_failed_reload_keeps_serving(model: Path, tmp_path: Path, photo_bytes: bytes) -> None:
    live = copy_model(model, tmp_path / "model")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(Settings(model_dir=live, admin_token=TOKEN))) as client:
        before = client.post("/classify", content=photo_bytes, headers={"content-type": "image/jpeg"}).json()
        corrupt_model(live)
        failed = client.post("/admin/reload", headers=auth)
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "reload_failed"
        assert "sha256" in failed.json()["error"]["message"]
        assert sample(client, "deepmad_reload_failures_total", trigger="http") == 1
        assert client.get("/readyz").status_code == 200
        after = client.post("/classify", content=photo_bytes, headers={"content-type": "image/jpeg"}).json()
        assert without_id(after) == without_id(before)

        # A good new version in place: the reload takes it.
        copy_model(model, live)
        manifest = Manifest.load(live)
        write_manifest(live, manifest.model_copy(update={"version": manifest.version + "-reloaded"}))
        ok = client.post("/admin/reload", headers=auth)
        assert ok.status_code == 200 and ok.json()["model"]["version"].endswith("-reloaded")
        assert client.get("/model").json()["version"].endswith("-reloaded")
        assert sample(client, "deepmad_reloads_total", trigger="http") == 1


# ---- startup ----


def test_missing_or_corrupt_model_is_a_startup_error(model: Path, tmp_path: Path) -> None:
    with (
        pytest.raises(ModelLoadError, match="does not exist"),
        TestClient(create_app(Settings(model_dir=tmp_path / "nowhere"))),
    ):
        pass
    broken = copy_model(model, tmp_path / "broken")
    corrupt_model(broken)
    with pytest.raises(ModelLoadError, match="sha256"), TestClient(create_app(Settings(model_dir=broken))):
        pass
    (broken / "manifest.json").write_text(json.dumps({"name": "x"}))
    with (
        pytest.raises(ModelLoadError, match="not a valid manifest"),
        TestClient(create_app(Settings(model_dir=broken))),
    ):
        pass


def test_without_model_is_503_until_loaded(model: Path, tmp_path: Path, photo_bytes: bytes) -> None:
    empty = tmp_path / "later"
    settings = Settings(model_dir=empty, require_model=False, admin_token=TOKEN)
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        for response in (
            client.get("/readyz"),
            client.get("/model"),
            client.post("/classify", content=photo_bytes, headers={"content-type": "image/jpeg"}),
        ):
            assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
        copy_model(model, empty)
        assert client.post("/admin/reload", headers={"X-Admin-Token": TOKEN}).status_code == 200
        assert client.post("/classify", content=photo_bytes, headers={"content-type": "image/jpeg"}).status_code == 200


def test_service_never_imports_torch() -> None:
    code = "import sys, service.app, service.__main__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=service_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_other_image_kinds_are_served(client: TestClient, photo_bytes: bytes) -> None:
    image = Image.open(io.BytesIO(photo_bytes))
    for mode, fmt in (("RGBA", "PNG"), ("P", "PNG"), ("L", "PNG"), ("CMYK", "JPEG"), ("RGB", "WEBP")):
        buffer = io.BytesIO()
        image.convert(mode).save(buffer, format=fmt)
        response = client.post("/classify", files={"file": (f"x.{fmt.lower()}", buffer.getvalue(), "image/*")})
        assert response.status_code == 200, (mode, fmt, response.text)


@pytest.mark.parametrize("threshold", [None, 2.0, 3.0, 4.5, 8.0])
def test_probability_agrees_with_verdict_for_any_threshold(
    model: Path, manifest: Manifest, trashnet_dir: Path, threshold: float | None
) -> None:
    """The calibration is centred on the threshold in use: anomalous iff probability >= 0.5."""
    if manifest.calibration is None:
        pytest.skip("the model under test has no calibration")
    recyclable, trash = photo_subset(trashnet_dir, per_class=4, trash=10)
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in recyclable + trash]
    with TestClient(create_app(Settings(model_dir=model, threshold=threshold))) as client:
        results = [item["result"] for item in client.post("/classify/batch", files=files).json()["results"]]
        single = client.post("/classify", files=[("file", files[0][1])]).json()
    assert without_id(single) == without_id(results[0])
    assert np.std([r["score"] for r in results]) > 0, "constant scores: the model is not looking at the image"
    for result in results:
        assert result["threshold"] == pytest.approx(manifest.threshold.value if threshold is None else threshold)
        assert (result["verdict"] == "anomalous") == (result["probability"] >= 0.5), result
    verdicts = {r["verdict"] for r in results}
    if threshold in (3.0, 4.5):  # inside the photos' score range: both verdicts occur
        assert verdicts == {"normal", "anomalous"}
