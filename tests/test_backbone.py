"""DeepMAD heads on the pretrained EfficientNet-Lite0: the CLI, the one graph, the manifest, the service.

Small on purpose (64x64 input, 16 photos per class, a few epochs): what is checked is the machinery —
ONNX Runtime against torch on the whole graph, the weights' hash, a served answer at the manifest's
size, fine-tuning that moves only the tuned blocks — and that the pretrained features already rank
trash above recyclables where a 32x32 encoder trained as briefly could not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.imaging import load_image_file
from service.manifest import Manifest
from tests.conftest import REPO_ROOT
from tests.service_support import run_server
from tests.test_fit_cli import fit
from training.backbones import Backbone, weights_file
from training.data import load_dataset, make_task
from training.data.folders import TRASHNET_NORMAL
from training.engine import RunOptions
from training.methods.backbone import CachedInputs, train_heads
from training.methods.deepmad import DeepMADConfig

SIZE = 64
RECIPE = ["--backbone", "efficientnet-lite0", "--input-size", str(SIZE), "--rep-dim", "16", "--head-hidden", "64"]


@pytest.fixture(scope="module")
def lite_fit(tmp_path_factory) -> tuple[Path, dict]:
    """The artifact of a small pretrained fit and the summary the CLI printed."""
    out = tmp_path_factory.mktemp("lite") / "trashnet-lite0-small"
    result = fit(
        "--dataset", "trashnet", *RECIPE, "--max-train-per-class", "16", "--epochs", "8", "--lr", "1e-3",
        "--delta", "2", "--anomaly-holdout", "0.5", "--outlier-exposure", "--augment", "--quiet", "--threads", "2",
        "--out", str(out), "--checkpoint", str(out.parent / "ckpt.pt"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout)


@pytest.fixture(scope="module")
def lite_model(lite_fit: tuple[Path, dict]) -> Path:
    return lite_fit[0]


def test_the_manifest_names_the_backbone_its_weights_and_the_input_size(lite_model: Path):
    manifest = Manifest.load(lite_model)
    assert manifest.input.model_dump() == {"height": SIZE, "width": SIZE, "channels": 3}
    assert manifest.backbone is not None and manifest.backbone.name == "efficientnet-lite0"
    expected = hashlib.sha256(weights_file("efficientnet-lite0").read_bytes()).hexdigest()
    assert manifest.backbone.weights_sha256 == expected and manifest.backbone.tune_blocks == 0
    assert manifest.hyperparameters["backbone"] == "efficientnet-lite0"


def test_one_graph_ranks_trash_above_recyclables_and_is_not_collapsed(lite_model: Path, trashnet_dir: Path):
    session = ort.InferenceSession(str(lite_model / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [SIZE, SIZE, 3]

    def scores(klass: str, count: int) -> np.ndarray:
        files = sorted((trashnet_dir / klass).glob("*.jpg"))[-count:]
        photos = np.stack([load_image_file(f, SIZE, SIZE, 3) for f in files])
        return session.run(["score"], {"image": photos})[0]

    normal = np.concatenate([scores(k, 12) for k in TRASHNET_NORMAL])
    trash = scores("trash", 30)
    everything = np.concatenate([normal, trash])
    assert everything.std() > 0.02 * everything.mean()
    assert len(np.unique(np.round(everything, 5))) > 0.9 * len(everything)
    # Rank-sum AUC of trash over recyclables: 0.5 is chance; 16 photos per class and 8 epochs clear it.
    ranks = np.argsort(np.argsort(everything)) + 1
    auc = (ranks[len(normal) :].sum() - len(trash) * (len(trash) + 1) / 2) / (len(trash) * len(normal))
    assert auc > 0.6, auc


def test_onnx_runtime_matches_torch_on_the_whole_graph(lite_fit: tuple[Path, dict]):
    """training.fit runs ONNX Runtime and torch on 64 test photos through the one graph (backbone included)."""
    model, summary = lite_fit
    assert summary["parity_max_abs_score"] < 1e-3, summary["parity_max_abs_score"]
    manifest = Manifest.load(model)
    assert manifest.model_sha256 == hashlib.sha256((model / "model.onnx").read_bytes()).hexdigest()


def test_the_service_classifies_a_photo_at_the_manifests_size(lite_model: Path, trashnet_dir: Path, tmp_path: Path):
    photo = sorted((trashnet_dir / "glass").glob("*.jpg"))[-1]
    with run_server(lite_model, tmp_path) as server, server.client() as client:
        answer = client.post("/classify", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
        described = client.get("/model").json()
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body["distances"]) == set(TRASHNET_NORMAL) and body["verdict"] in {"normal", "anomalous"}
    assert described["input"] == {"height": SIZE, "width": SIZE, "channels": 3}
    assert described["backbone"]["name"] == "efficientnet-lite0"


def test_fine_tuning_moves_the_tuned_blocks_only(trashnet_dir: Path):
    task = make_task(load_dataset("trashnet", trashnet_dir, SIZE, None), TRASHNET_NORMAL, 8, 0)
    config = DeepMADConfig(backbone="efficientnet-lite0", tune_blocks=1, rep_dim=8, head_hidden=16, epochs=2, lr=1e-3)
    inputs = CachedInputs.of(task, config, torch.device("cpu"))
    before = {k: v.clone() for k, v in inputs.backbone.state_dict().items()}
    encoder, _, _ = train_heads(inputs, {}, task.n_normal, config, RunOptions(torch.device("cpu")), one_class=False)
    after = encoder.backbone.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("tuned.") for k in moved), sorted(moved)[:5]
    untouched = Backbone.pretrained("efficientnet-lite0", 1).state_dict()
    assert all(torch.equal(untouched[k], after[k]) for k in after if k.startswith("frozen."))


SHIPPED_LITE0 = REPO_ROOT / "models" / "trashnet-lite0"


def test_the_shipped_pretrained_model_serves_real_photos(trashnet_dir: Path, tmp_path: Path):
    """models/trashnet-lite0 as a bin serves it: golden scores verified on this CPU, 224x224 input, trash
    flagged more often than recyclables, scores spread (not a collapsed network: the Deep SAD push keeps
    moving the heads, which could have mapped everything onto the centres)."""
    manifest = Manifest.load(SHIPPED_LITE0)
    assert manifest.input.height == 224 and manifest.backbone.name == "efficientnet-lite0"
    assert manifest.backbone.tune_blocks == 0 and manifest.backbone.tuned_weights_sha256 is None
    assert manifest.hyperparameters["anomaly_push"] == "deepsad" and manifest.score.rule == "min_distance"
    assert manifest.golden is not None
    photos = {k: sorted((trashnet_dir / k).glob("*.jpg"))[:8] for k in [*TRASHNET_NORMAL, "trash"]}
    with run_server(SHIPPED_LITE0, tmp_path) as server, server.client() as client:
        described = client.get("/model").json()
        answers = {
            k: [client.post("/classify", files={"file": (p.name, p.read_bytes(), "image/jpeg")}).json() for p in files]
            for k, files in photos.items()
        }
    assert described["version"] == "3.1.0" and described["golden"]["status"] == "verified", described["golden"]
    scores = np.array([a["score"] for answers_of in answers.values() for a in answers_of])
    assert scores.std() > 0.05 * np.abs(scores).mean() and len(np.unique(np.round(scores, 4))) > 0.9 * len(scores)
    trash_flagged = np.mean([a["verdict"] == "anomalous" for a in answers["trash"]])
    normal_flagged = np.mean([a["verdict"] == "anomalous" for k in TRASHNET_NORMAL for a in answers[k]])
    assert trash_flagged > normal_flagged, (trash_flagged, normal_flagged)
    routed = np.mean([a["nearest_class"] == k for k in TRASHNET_NORMAL for a in answers[k]])
    assert routed > 0.6, routed
