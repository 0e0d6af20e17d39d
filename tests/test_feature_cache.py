"""The per-photo caches (``flywheel.photo_cache``, ``training.features``): a photo runs through the backbone
once per view, a new photo costs one forward, and a damaged entry is computed again."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.flywheel import main
from flywheel.photo_cache import EntryStore, decoded_files
from flywheel.promote import open_model, score
from service.imaging import load_image_file
from training.backbones import Backbone, lite_normaliser
from training.batches import to_float
from training.features import fixed_outputs, score_arrays
from training.methods.backbone import BackboneEncoder, GroupedHead
from training.scorer import Scorer

SIZE = 32  # the backbone's smallest input: the cache's behaviour does not depend on it


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DEEPMAD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return Backbone.pretrained("efficientnet-lite0")


class Counted:
    """Counts the photos that go through ``module``'s forward (a hook sees every call, however it is made)."""

    def __init__(self, module: torch.nn.Module):
        self.photos = 0
        self.handle = module.register_forward_hook(self.count)

    def count(self, module, inputs, output) -> None:
        self.photos += inputs[0].shape[0]

    def __enter__(self) -> Counted:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def photos(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def fresh(backbone: Backbone, images: np.ndarray, mirrored: bool = False) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(images)
        x = x.flip(2) if mirrored else x
        return backbone.eval()(to_float(x, lite_normaliser())).numpy()


def test_a_second_call_runs_the_backbone_on_the_new_photos_only(backbone: Backbone):
    old, new = photos(20, 0), photos(7, 1)
    with Counted(backbone) as counted:
        first = fixed_outputs(backbone, old)
    assert counted.photos == 20
    both = np.concatenate([old[:10], new, old[10:]])
    with Counted(backbone) as counted:
        second = fixed_outputs(backbone, both)
    assert counted.photos == 7
    np.testing.assert_array_equal(second[:10], first[:10])
    np.testing.assert_allclose(second, fresh(backbone, both), rtol=1e-5, atol=1e-5)
    with Counted(backbone) as counted:
        again = fixed_outputs(backbone, both[::-1])
    assert counted.photos == 0
    np.testing.assert_array_equal(again, second[::-1])


def test_a_photo_twice_in_one_call_runs_once(backbone: Backbone):
    images = photos(3, 2)
    with Counted(backbone) as counted:
        out = fixed_outputs(backbone, np.concatenate([images, images[:1]]))
    assert counted.photos == 3
    np.testing.assert_array_equal(out[0], out[3])


def test_the_mirrored_view_is_its_own_entry(backbone: Backbone):
    images = photos(4, 3)
    plain = fixed_outputs(backbone, images)
    with Counted(backbone) as counted:
        mirrored = fixed_outputs(backbone, images, mirrored=True)
    assert counted.photos == 4
    assert not np.allclose(plain, mirrored)
    np.testing.assert_allclose(mirrored, fresh(backbone, images, mirrored=True), rtol=1e-5, atol=1e-5)


def test_other_weights_are_other_entries(backbone: Backbone):
    images = photos(2, 4)
    fixed_outputs(backbone, images)
    other = Backbone.pretrained("efficientnet-lite0")
    other.weights_sha256 = "0" * 64  # the key covers the weights: a fine-tuned backbone.pt is another cache
    with Counted(other) as counted:
        fixed_outputs(other, images)
    assert counted.photos == 2


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty"])
def test_a_damaged_entry_is_found_and_computed_again(backbone: Backbone, cache: Path, damage: str):
    images = photos(5, 5)
    expected = fixed_outputs(backbone, images)
    entries = sorted((cache / "features").rglob("*.entry"))
    assert len(entries) == 5
    data = entries[0].read_bytes()
    entries[0].write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "flipped": data[:-100] + bytes([data[-100] ^ 1]) + data[-99:],
            "empty": b"",
        }[damage]
    )
    with Counted(backbone) as counted:
        again = fixed_outputs(backbone, images)
    assert counted.photos == 1
    np.testing.assert_allclose(again, expected, rtol=1e-5, atol=1e-5)  # a batch of one rounds a little otherwise
    assert EntryStore("features").get(entries[0].stem) is not None  # stored again, whole


def test_no_temporary_files_are_left(backbone: Backbone, cache: Path):
    fixed_outputs(backbone, photos(3, 6))
    assert not [p for p in cache.rglob("*") if p.name.startswith(".")]


def test_decoded_files_decode_only_new_files_and_follow_content(tmp_path: Path):
    files = []
    for i in range(4):
        files.append(tmp_path / f"{i}.bin")
        files[-1].write_bytes(bytes([i]) * 10)
    decoded = []

    def decode(path: Path) -> np.ndarray:
        decoded.append(path.name)
        return np.full((2, 2, 1), path.read_bytes()[0], np.uint8)

    first = decoded_files(files[:3], (2, 2, 1), decode)
    assert decoded == ["0.bin", "1.bin", "2.bin"]
    decoded.clear()
    second = decoded_files(files, (2, 2, 1), decode)
    assert decoded == ["3.bin"]
    np.testing.assert_array_equal(second[:3], first)
    files[0].write_bytes(bytes([9]) * 10)  # same name, new content: decoded again
    decoded.clear()
    assert decoded_files(files[:1], (2, 2, 1), decode)[0, 0, 0, 0] == 9
    assert decoded == ["0.bin"]
    assert decoded_files([], (2, 2, 1), decode).shape == (0, 2, 2, 1)


def test_scores_from_cached_features_equal_the_whole_graph(backbone: Backbone):
    torch.manual_seed(0)
    head = GroupedHead(3, backbone.out_dim, 16, 4)
    encoder = BackboneEncoder(backbone, head, SIZE, torch.zeros(backbone.out_dim), torch.ones(backbone.out_dim))
    scorer = Scorer(encoder, torch.randn(3, 4), lite_normaliser()).eval()
    images = photos(6, 7)
    expected = scorer.score_arrays(images)
    with Counted(backbone) as counted:
        got = score_arrays(scorer, images)
        score_arrays(scorer, images)
    assert counted.photos == 12  # each photo and its mirror image (the next retrain may train on it), once
    with Counted(backbone) as counted:
        fixed_outputs(backbone, images, mirrored=True)
    assert counted.photos == 0
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-4)


def test_the_gate_scores_each_audit_photo_once_per_graph(tmp_path: Path, trashnet_dir: Path):
    model = open_model("--current", Path(__file__).resolve().parents[1] / "models" / "trashnet")
    photos = sorted((trashnet_dir / "glass").iterdir())[:5]
    files = []
    for photo in photos:
        files.append(tmp_path / photo.name)
        files[-1].write_bytes(photo.read_bytes())
    counted = CountedModel(model)
    first = score(counted, files[:3])
    second = score(counted, files)
    assert counted.batches == [3, 2]
    np.testing.assert_array_equal(second[0][:3], first[0])
    want = model.run(np.stack([load_image_file(p, *model.input_shape) for p in files]))
    np.testing.assert_allclose(second[0], want.score, rtol=1e-6)
    np.testing.assert_array_equal(second[1], want.nearest)


class CountedModel:
    """A loaded model whose ``run`` counts the photos it scores (the model itself is frozen)."""

    def __init__(self, model):
        self.model, self.batches = model, []

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def run(self, batch: np.ndarray):
        self.batches.append(len(batch))
        return self.model.run(batch)


def test_the_retrain_bench_refuses_bad_input_in_one_line(capsys: pytest.CaptureFixture[str]):
    assert main(["--retrain-only", "--new-photos", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --retrain-only needs --new-photos >= 1")


def test_writers_at_once_never_show_a_reader_half_an_entry(cache: Path):
    store, want = EntryStore("race"), np.arange(50_000, dtype=np.float32).reshape(100, 500)
    seen, stop = [], threading.Event()

    def write() -> None:
        for _ in range(40):
            store.put("ab" * 20, want)

    def read() -> None:
        while not stop.is_set():
            got = store.get("ab" * 20)
            seen.append(got is None or np.array_equal(got, want))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write) for _ in range(4)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reader.join()
    assert seen and all(seen)
    np.testing.assert_array_equal(store.get("ab" * 20), want)
    assert [p.name for p in (cache / "race").rglob("*")] == ["ab", "ab" * 20 + ".entry"]
