"""The few-shot recipe for a new category (``--fill-classes --class-scale``, chosen by ``bench.new_class``'s CV).

On real features of a small TrashNet subset (frozen Lite0 at 64x64, cached): the rows it adds, the heads
it trains through the product's ``train_heads``, where it refuses to run, and ``training.fit`` with the
flag on a folder tree (as the export writes it) whose new class has few photos.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from service.imaging import load_image_file
from service.manifest import Manifest
from tests.test_fit_cli import fit
from training.backbones import Backbone
from training.engine import RunOptions
from training.errors import UserError
from training.features import fixed_outputs
from training.methods.backbone import CachedInputs, few_photo_scales, filled, inverse_frequency, train_heads
from training.methods.deepmad import AnomalyTerms, DeepMADConfig, deepmad_loss

SIZE = 64
COUNTS = {"cardboard": 16, "glass": 16, "metal": 5, "trash": 3}  # metal: the new class, few photos
HEADS = {"rep_dim": 8, "head_hidden": 16, "delta": 2.0, "epochs": 3, "batch_size": 32, "augment": True}


@pytest.fixture(scope="module")
def inputs(trashnet_dir: Path) -> CachedInputs:
    """Both views of the subset's cached Lite0 features; labels 0..2, trash -1."""
    files, labels = [], []
    for column, (name, count) in enumerate(COUNTS.items()):
        files += sorted((trashnet_dir / name).glob("*.jpg"))[:count]
        labels += [-1 if name == "trash" else column] * count
    images = np.stack([load_image_file(f, SIZE, SIZE, 3) for f in files])
    backbone = Backbone.pretrained("efficientnet-lite0")
    views = [torch.from_numpy(fixed_outputs(backbone, images, mirrored)) for mirrored in (False, True)]
    return CachedInputs(backbone, torch.cat(views), torch.tensor(labels).repeat(2), len(files), SIZE)


def test_a_class_with_few_photos_is_filled_to_the_median_with_borrowed_offsets(inputs):
    out = filled(inputs, 3, seed=0)
    photos = inputs.n_photos
    assert out.n_photos == photos + 16 - 5  # metal filled up to the median class's 16
    labels = out.labels[: out.n_photos]
    assert labels[photos:].tolist() == [2] * 11 and torch.equal(out.labels, labels.repeat(2))
    real = inputs.labels[:photos]
    for view in range(2):
        given = inputs.fixed[view * photos : (view + 1) * photos]
        rows = out.fixed[view * out.n_photos : (view + 1) * out.n_photos]
        assert torch.equal(rows[:photos], given)  # the photos themselves are untouched
        means = torch.stack([given[real == c].mean(0) for c in range(3)])
        offsets = rows[photos:] - means[2]
        donors = given[real <= 1] - means[real[real <= 1]]  # only the classes that have the median count lend
        nearest = (offsets.unsqueeze(1) - donors.unsqueeze(0)).abs().amax(-1).min(1)
        assert nearest.values.max() < 1e-4
        if view == 0:
            first = nearest.indices
        else:  # each added row is one donor photo in both views, as a photo and its mirror image are
            assert torch.equal(nearest.indices, first)


def test_classes_with_enough_photos_and_trash_are_left_alone(inputs):
    balanced = CachedInputs(inputs.backbone, inputs.fixed, inputs.labels.clamp_max(1), inputs.n_photos, SIZE)
    assert filled(balanced, 2, seed=0) is balanced


def test_heads_train_on_the_filled_rows_and_keep_one_centre_per_class(inputs):
    config = DeepMADConfig(backbone="efficientnet-lite0", fill_classes=True, **HEADS)
    encoder, centres, log = train_heads(inputs, {}, 3, config, RunOptions(torch.device("cpu")), False)
    assert centres.shape == (3, 8) and torch.isfinite(centres).all()
    assert len(log.losses["encoder_loss"]) == 3 and torch.isfinite(torch.tensor(log.losses["encoder_loss"])).all()
    with torch.no_grad():
        distances = (encoder.from_fixed(inputs.fixed[: inputs.n_photos]) - centres).pow(2).sum(-1)
    assert torch.isfinite(distances).all() and distances.std() > 0


@pytest.mark.parametrize("settings", [{}, {"backbone": "efficientnet-lite0", "tune_blocks": 1}])
def test_fill_needs_a_frozen_backbone(settings):
    with pytest.raises(UserError, match="--fill-classes needs a frozen --backbone"):
        DeepMADConfig(fill_classes=True, **settings)


def test_a_retrain_on_a_tree_with_a_new_class_folder_learns_it_with_the_recipe(tmp_path: Path, trashnet_dir: Path):
    """The export's tree (one folder per class, trash as exposure; bench.flywheel.folder_exposure(24) gives
    the holdout and exposure flags) with a new class of 10 photos."""
    for name, count in {"cardboard": 30, "glass": 30, "battery": 10, "trash": 24}.items():
        source = trashnet_dir / ("metal" if name == "battery" else name)
        (tmp_path / "tree" / name).mkdir(parents=True)
        for photo in sorted(source.glob("*.jpg"))[:count]:
            shutil.copyfile(photo, tmp_path / "tree" / name / photo.name)
    out = tmp_path / "model"
    result = fit(
        "--dataset", "folder", "--data", str(tmp_path / "tree"), "--normal", "cardboard,glass,battery",
        "--anomaly-holdout", "0.45", "--outlier-exposure", "--exposure-from-train", "17", "--backbone",
        "efficientnet-lite0", "--input-size", str(SIZE), "--rep-dim", "8", "--head-hidden", "16", "--epochs", "3",
        "--anomaly-push", "deepsad", "--anomaly-weight", "50", "--augment", "--fill-classes", "--quiet",
        "--threads", "2", "--out", str(out), "--checkpoint", str(tmp_path / "ckpt.pt"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = Manifest.load(out)
    assert manifest.class_names == ["cardboard", "glass", "battery"]
    assert manifest.hyperparameters["fill_classes"] is True


def test_class_push_weighs_a_small_class_as_much_as_a_large_one():
    """Two photos of class 0 and one of class 1, each at distance 1 from the other class's centre."""
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    z = torch.tensor([[[0.0, 0.0], [9.0, 0.0]], [[0.0, 0.0], [9.0, 0.0]], [[1.0, 0.0], [10.0, 0.0]]])
    labels = torch.tensor([0, 0, 1])
    weights = inverse_frequency(labels, 2)
    assert weights.tolist() == pytest.approx([0.75, 1.5])
    terms = AnomalyTerms("deepsad", 50.0, 0, 2.0)
    _, per_head = deepmad_loss(z, centres, labels, 1.0, 2.0, anomaly=terms, class_weights=weights)
    # head 1 is pushed by class 0's two photos, head 0 by class 1's one photo: the same total weight
    assert per_head[0].item() == pytest.approx(per_head[1].item())
    hinge, _ = deepmad_loss(z, centres, labels, 1.0, 2.0, anomaly=AnomalyTerms("deepsad", 50.0))
    assert hinge.item() != pytest.approx(per_head.sum().item())


def test_class_scale_shrinks_a_few_photo_class_s_distances_exactly_in_the_graph(inputs):
    """Metal (5 photos, median 16) with k = 0.3: its distances times 1 - 0.3 (1 - 5/16); the others' kept."""
    config = DeepMADConfig(backbone="efficientnet-lite0", **HEADS)
    run = RunOptions(torch.device("cpu"))
    plain, plain_centres, _ = train_heads(inputs, {}, 3, config, run, False)
    scaled, centres, _ = train_heads(inputs, {}, 3, replace(config, class_scale=0.3), run, False)
    assert few_photo_scales(inputs.labels, 3, 0.3).tolist() == pytest.approx([1.0, 1.0, 1 - 0.3 * (1 - 5 / 16)])
    with torch.no_grad():
        before = (plain.from_fixed(inputs.fixed) - plain_centres).pow(2).sum(-1).sqrt()
        after = (scaled.from_fixed(inputs.fixed) - centres).pow(2).sum(-1).sqrt()
    expected = before * torch.tensor([1.0, 1.0, 1 - 0.3 * (1 - 5 / 16)])
    assert torch.allclose(after, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fill-classes"], "--fill-classes needs a frozen --backbone"),
        (["--backbone", "efficientnet-lite0", "--tune-blocks", "1", "--fill-classes"], "needs a frozen --backbone"),
        (["--class-scale", "0.5"], "--class-scale needs --backbone"),
        (["--backbone", "efficientnet-lite0", "--class-scale", "1"], "--class-scale must be less than 1"),
        (["--class-push", "1"], "--class-push needs --backbone"),
    ],
)
def test_the_recipe_s_flags_refuse_bad_input_in_one_line(flags: list[str], message: str, tmp_path: Path):
    result = fit("--dataset", "trashnet", *flags, "--out", str(tmp_path / "model"), "--quiet")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr[-1000:]
    assert not (tmp_path / "model").exists()
