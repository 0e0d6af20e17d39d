"""The anomaly terms (Deep SAD push, anomaly centres) and every block of the backbone tuned under DeepMAD's loss.

Small on purpose (32x32 input, 8 photos per class, 2 epochs): what is checked is the machinery. The
loss terms on tensors; the tuned graph through the CLI (score rule in the manifest and the answers,
ONNX Runtime against torch, backbone.pt and its hash, scores that are not collapsed); an interrupted
tuning that resumes to the same weights; and a heads-only retrain on the tuned backbone's file.
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
from service.manifest import BACKBONE_FILE, Manifest
from tests.service_support import run_server
from tests.test_fit_cli import fit
from training.backbones import ALL_BLOCKS, Backbone, lite_normaliser
from training.batches import to_float
from training.data import load_dataset, make_task
from training.data.folders import TRASHNET_NORMAL
from training.engine import RunOptions
from training.kmeans import kmeans
from training.methods import backbone as backbone_module
from training.methods.deepmad import AnomalyTerms, DeepMADConfig, deepmad_loss

SIZE = 32
TUNED = [
    "--backbone", "efficientnet-lite0", "--input-size", str(SIZE), "--tune-blocks", "all", "--rep-dim", "8",
    "--head-hidden", "16", "--delta", "2", "--batch-size", "16", "--max-train-per-class", "8",
    "--anomaly-holdout", "0.5", "--outlier-exposure", "--augment", "--augment-strength", "strong",
    "--quiet", "--threads", "2",
]  # fmt: skip


def push_gradient(terms: AnomalyTerms, distance: float) -> float:
    """|d loss / d z| for one labelled anomaly at ``distance`` from the only normal centre."""
    z = torch.tensor([[[distance, 0.0]]], requires_grad=True)
    loss, _ = deepmad_loss(z, torch.zeros(1, 2), torch.tensor([-1]), eta=1.0, delta=2.0, anomaly=terms)
    loss.backward()
    return float(z.grad.norm())


def test_deep_sad_push_keeps_teaching_past_delta_where_the_hinge_stops():
    assert push_gradient(AnomalyTerms("hinge"), 1.0) > 0 and push_gradient(AnomalyTerms("hinge"), 3.0) == 0
    assert push_gradient(AnomalyTerms("deepsad", 20.0), 3.0) > 0
    # the push weakens with distance but never vanishes, and is bounded on the centre itself
    assert push_gradient(AnomalyTerms("deepsad", 20.0), 3.0) > push_gradient(AnomalyTerms("deepsad", 20.0), 6.0) > 0
    loss, _ = deepmad_loss(
        torch.zeros(1, 1, 2), torch.zeros(1, 2), torch.tensor([-1]), 1.0, 2.0, anomaly=AnomalyTerms("deepsad", 20.0)
    )
    assert torch.isfinite(loss) and float(loss) == pytest.approx(20.0 / 0.1)


def test_an_anomaly_centre_pulls_its_anomalies_and_pushes_the_recyclables():
    """Columns: one normal class, one anomaly centre. An anomaly (label 1) at its centre costs nothing
    there; a recyclable on the anomaly centre is pushed away from it (delta hinge)."""
    centres = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    terms = AnomalyTerms("hinge", centres=1)
    at_home = torch.tensor([[[4.0, 0.0], [4.0, 0.0]]])  # an anomaly sitting on its centre, far from the normal one
    _, per_column = deepmad_loss(at_home, centres, torch.tensor([1]), 1.0, 2.0, anomaly=terms)
    assert per_column.tolist() == pytest.approx([0.0, 0.0])
    intruder = torch.tensor([[[0.0, 0.0], [4.0, 0.0]]])  # a recyclable (label 0) on the anomaly centre
    _, per_column = deepmad_loss(intruder, centres, torch.tensor([0]), 1.0, 2.0, anomaly=terms)
    assert per_column[0] == 0 and per_column[1] == pytest.approx(4.0)


def test_kmeans_finds_separated_groups_and_keeps_k():
    generator = torch.Generator().manual_seed(0)
    offsets = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]).repeat_interleave(20, 0)
    points = offsets + torch.randn(60, 2, generator=generator)
    assignment = kmeans(points, 3, torch.Generator().manual_seed(1))
    groups = [set(assignment[i * 20 : (i + 1) * 20].tolist()) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3
    assert kmeans(points[:5], 5, torch.Generator().manual_seed(0)).unique().numel() == 5


@pytest.fixture(scope="module")
def tuned_fit(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tuned") / "tuned-small"
    result = fit(
        "--dataset", "trashnet", *TUNED, "--epochs", "2", "--anomaly-push", "deepsad", "--anomaly-centres", "2",
        "--out", str(out), "--checkpoint", str(out.parent / "ckpt.pt"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout)


def test_the_tuned_graph_carries_its_score_rule_and_its_backbone(tuned_fit: tuple[Path, dict]):
    model, summary = tuned_fit
    manifest = Manifest.load(model)
    assert manifest.score.rule == "min_distance_minus_anomaly_centres" and manifest.score.anomaly_centres == 2
    assert manifest.backbone.tune_blocks == 16  # "all" of Lite0's MBConv blocks
    assert manifest.backbone.tuned_weights_sha256 == hashlib.sha256((model / BACKBONE_FILE).read_bytes()).hexdigest()
    assert manifest.hyperparameters["anomaly_push"] == "deepsad" and manifest.class_names == list(TRASHNET_NORMAL)
    assert summary["parity_max_abs_score"] < 1e-3
    session = ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].shape[1] == 5  # the anomaly centres stay inside the graph


def test_tuned_scores_are_not_collapsed(tuned_fit: tuple[Path, dict], trashnet_dir: Path):
    """A tuned backbone can map everything onto the centres: real photos must get spread, distinct scores."""
    model, _ = tuned_fit
    session = ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
    files = [f for k in [*TRASHNET_NORMAL, "trash"] for f in sorted((trashnet_dir / k).glob("*.jpg"))[-6:]]
    photos = np.stack([load_image_file(f, SIZE, SIZE, 3) for f in files])
    distances, scores, _ = session.run(None, {"image": photos})
    assert scores.std() > 0.01 * np.abs(scores).mean() and len(np.unique(np.round(scores, 5))) > 0.9 * len(scores)
    assert distances.std(axis=0).min() > 1e-3  # every class's distance varies across photos


def test_the_service_says_the_score_rule(tuned_fit: tuple[Path, dict], trashnet_dir: Path, tmp_path: Path):
    model, _ = tuned_fit
    photo = sorted((trashnet_dir / "metal").glob("*.jpg"))[-1]
    with run_server(model, tmp_path) as server, server.client() as client:
        described = client.get("/model").json()
        answer = client.post("/classify", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}).json()
    assert described["score"]["rule"] == answer["score_rule"] == "min_distance_minus_anomaly_centres"
    assert described["score"]["anomaly_centres"] == 2 and described["backbone"]["tuned_weights_sha256"]
    assert set(answer["distances"]) == set(TRASHNET_NORMAL)


def test_heads_retrain_on_the_tuned_backbone_file(tuned_fit: tuple[Path, dict], tmp_path: Path):
    """The flywheel's path: --backbone-weights backbone.pt, frozen, heads only; the file travels with the model."""
    model, _ = tuned_fit
    weights = model / BACKBONE_FILE
    out = tmp_path / "retrained"
    result = fit(
        "--dataset", "trashnet", "--backbone", "efficientnet-lite0", "--input-size", str(SIZE), "--rep-dim", "8",
        "--head-hidden", "16", "--max-train-per-class", "8", "--epochs", "2", "--backbone-weights", str(weights),
        "--quiet", "--out", str(out), "--checkpoint", str(tmp_path / "ckpt.pt"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = Manifest.load(out)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest.backbone.weights_sha256 == digest == manifest.backbone.tuned_weights_sha256
    assert manifest.backbone.tune_blocks == 0 and (out / BACKBONE_FILE).read_bytes() == weights.read_bytes()


def test_an_interrupted_tuning_resumes_to_the_same_weights(trashnet_dir: Path, tmp_path: Path, monkeypatch):
    """Killed mid-way through epoch 2, resumed from epoch 1's checkpoint: the same weights as one uninterrupted
    run (AdamW, the one-cycle schedule and both generators restored). And the backbone file of the result
    reads back as the same network."""
    task = make_task(load_dataset("trashnet", trashnet_dir, SIZE, None), TRASHNET_NORMAL, 6, 0, 0.5, True)
    config = DeepMADConfig(
        backbone="efficientnet-lite0", tune_blocks=ALL_BLOCKS, rep_dim=8, head_hidden=16, epochs=2, batch_size=16,
        augment=True, augment_strength="strong", anomaly_push="deepsad", delta=2.0,
    )  # fmt: skip
    labels = torch.from_numpy(task.train.labels)

    def train(checkpoint: Path, resume: bool = False):
        run = RunOptions(torch.device("cpu"), checkpoint=checkpoint, resume=resume)
        return backbone_module.train_tuned(task.train.images, labels, 5, {}, config, run, one_class=False)

    reference, _, _ = train(tmp_path / "reference.pt")
    steps_per_epoch = -(-len(labels) // config.batch_size)
    original, calls = backbone_module.objective, []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) > steps_per_epoch + 1:  # one step into epoch 2
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(backbone_module, "objective", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "run.pt")
    monkeypatch.setattr(backbone_module, "objective", original)
    resumed, _, _ = train(tmp_path / "run.pt", resume=True)
    expected, got = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    before = Backbone.pretrained("efficientnet-lite0", ALL_BLOCKS).state_dict()
    moved = {k for k in before if not torch.equal(before[k], expected[f"backbone.{k}"])}
    assert moved and all(k.startswith("tuned.") for k in moved)  # the blocks train; the stem and BN statistics stay
    assert any(k.startswith("tuned.0.") for k in moved)  # the first MBConv block too: every block

    torch.save(resumed.backbone.state_for_file(), tmp_path / "backbone.pt")
    reloaded = Backbone.pretrained("efficientnet-lite0", 0, tmp_path / "backbone.pt")
    x = to_float(torch.from_numpy(task.test.images[:4]), lite_normaliser())
    with torch.no_grad():
        assert torch.allclose(reloaded(x), resumed.backbone(x), atol=1e-5)
