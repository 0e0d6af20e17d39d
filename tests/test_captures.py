"""flywheel.captures on capture stores made of real TrashNet photos: export, audit split, Label Studio."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from flywheel.captures import (
    LS_LOCAL_FILES,
    SHA_PREFIX,
    in_audit,
    labeling_config,
    read_capture,
)
from service.labels import valid_labels
from service.manifest import Manifest
from tests.capture_support import open_model, tree_files, write_capture
from tests.conftest import REPO_ROOT
from tests.service_support import model_dir, photo_subset
from training.data.folders import load_folder

DAY = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone.utc)


def captures_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flywheel.captures", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def model():
    return open_model(model_dir())


@pytest.fixture(scope="module")
def photos(trashnet_dir: Path) -> list[tuple[Path, str]]:
    """5 photos of each recyclable class and 8 trash photos, each with its true label."""
    recyclable, trash = photo_subset(trashnet_dir, per_class=5, trash=8)
    return [(p, p.parent.name) for p in recyclable + trash]


def capture_all(root: Path, model, photos, *, labelled: bool = True, prefix: str = "c") -> list[dict]:
    return [
        write_capture(
            root,
            model,
            photo,
            capture_id=f"{prefix}{i:03d}",
            when=DAY + dt.timedelta(minutes=i),
            label=label if labelled else None,
        )
        for i, (photo, label) in enumerate(photos)
    ]


def test_audit_choice_is_a_fixed_hash_of_the_id():
    ids = [f"id-{i}" for i in range(2000)]
    chosen = [i for i in ids if in_audit(i, 0.2)]
    assert 0.17 < len(chosen) / len(ids) < 0.23
    assert chosen == [i for i in ids if in_audit(i, 0.2)]
    # Pinned: changing the hash would silently move old captures between the audit and training trees.
    assert [in_audit(f"id-{i}", 0.2) for i in range(8)] == [False, False, False, False, False, False, True, False]
    assert all(in_audit(i, 0.4) for i in chosen)  # a larger share keeps every earlier audit capture


def test_export_deduplicates_and_keeps_a_fixed_audit_share(tmp_path: Path, model, photos):
    captures, out, audit = tmp_path / "captures", tmp_path / "data", tmp_path / "audit"
    sidecars = capture_all(captures, model, photos)
    # The same two photos arrive again later under new ids (a bin sees the same item twice).
    for n, (photo, label) in enumerate(photos[:2]):
        sidecars.append(write_capture(captures, model, photo, capture_id=f"again{n}", label=label))
    capture_all(captures, model, photos[:3], labelled=False, prefix="u")  # unlabelled: never exported

    first = ok(captures_cli("export", "--captures", captures, "--out", out, "--audit-out", audit))
    assert first["labelled"] == len(photos) + 2 and first["unlabelled"] == 3
    assert first["written"] + first["audit_written"] + first["duplicates"] == len(photos) + 2
    assert first["duplicates"] == 2  # a photo already in either tree is never written again
    train_files, audit_files = tree_files(out), tree_files(audit)
    assert len(train_files) + len(audit_files) == len(photos)  # each photo once, across both trees
    for name, data in {**train_files, **audit_files}.items():
        label, file_name = name.split("/")
        assert file_name == hashlib.sha256(data).hexdigest()[:SHA_PREFIX] + ".jpg"
    train_hashes = {hashlib.sha256(d).hexdigest() for d in train_files.values()}
    audit_hashes = {hashlib.sha256(d).hexdigest() for d in audit_files.values()}
    assert not train_hashes & audit_hashes
    # The audit tree holds exactly the photos whose first capture id hashes into the audit share.
    expected_audit = {s["image_sha256"] for s in sidecars[: len(photos)] if in_audit(s["id"], 0.2)}
    assert audit_hashes == expected_audit and 0 < len(expected_audit) < len(photos)
    for name in train_files:  # labels land in their class folders, the anomaly label included
        assert name.split("/")[0] in valid_labels(model.manifest)
    assert (out / "trash").is_dir()

    again = ok(captures_cli("export", "--captures", captures, "--out", out, "--audit-out", audit))
    assert again["written"] == again["audit_written"] == 0
    assert tree_files(out) == train_files and tree_files(audit) == audit_files

    # New captures later: earlier photos stay where they were, new ones are added by their own id hash.
    more = photo_subset(photos[0][0].parents[1], per_class=9, trash=12)
    new = [(p, p.parent.name) for p in more[0] + more[1] if (p, p.parent.name) not in photos]
    capture_all(captures, model, new, prefix="n")
    third = ok(captures_cli("export", "--captures", captures, "--out", out, "--audit-out", audit))
    assert third["written"] + third["audit_written"] == len(new)
    assert set(train_files) <= set(tree_files(out)) and set(audit_files) <= set(tree_files(audit))


def test_export_merges_into_a_tree_that_training_reads(tmp_path: Path, model, photos, trashnet_dir: Path):
    captures, out = tmp_path / "captures", tmp_path / "data"
    # An existing tree: TrashNet photos under their own names, one folder per class.
    for name in ("cardboard", "glass", "metal", "paper", "plastic", "trash"):
        (out / name).mkdir(parents=True)
        for photo in sorted((trashnet_dir / name).glob("*.jpg"))[-6:]:
            (out / name / photo.name).write_bytes(photo.read_bytes())
    before = tree_files(out)
    capture_all(captures, model, photos)
    counts = ok(captures_cli("export", "--captures", captures, "--out", out, "--audit-share", "0"))
    assert counts["written"] == len(photos) and counts["audit_held_back"] == 0
    after = tree_files(out)
    assert all(after[name] == data for name, data in before.items())
    assert len(after) == len(before) + len(photos)

    dataset = load_folder(out, (32, 32, 3))  # what `training.fit --dataset folder --data DIR` reads
    assert dataset.class_names == ["cardboard", "glass", "metal", "paper", "plastic", "trash"]
    total = len(dataset.train) + len(dataset.val) + len(dataset.test)
    assert total == len(after)


def test_a_changed_label_moves_the_photo(tmp_path: Path, model, photos):
    captures, out = tmp_path / "captures", tmp_path / "data"
    photo, _ = next(p for p in photos if p[1] == "glass")
    sidecar = write_capture(captures, model, photo, capture_id="relabel1", when=DAY, label="glass")
    assert not in_audit("relabel1", 0.2)
    ok(captures_cli("export", "--captures", captures, "--out", out))
    name = sidecar["image_sha256"][:SHA_PREFIX] + ".jpg"
    assert (out / "glass" / name).is_file()
    path = captures / "2026-11-28" / "relabel1.json"
    data = json.loads(path.read_text())
    data.update(label="plastic", labelled_at="2026-11-28T13:00:00.000000Z")
    path.write_text(json.dumps(data))
    counts = ok(captures_cli("export", "--captures", captures, "--out", out))
    assert counts["relabelled"] == 1 and counts["written"] == 0
    assert (out / "plastic" / name).is_file() and not (out / "glass" / name).exists()


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, model, photos):
    captures = tmp_path / "captures"
    missing = captures_cli("export", "--captures", tmp_path / "nowhere", "--out", tmp_path / "data")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    write_capture(captures, model, photos[0][0], capture_id="x1", label="cardboard")
    same = captures_cli("export", "--captures", captures, "--out", tmp_path / "d", "--audit-out", tmp_path / "d")
    assert same.returncode == 2 and same.stderr.count("\n") == 1
    (captures / "2026-01-01").mkdir()
    (captures / "2026-01-01" / "broken.json").write_text("{not json")
    broken = captures_cli("export", "--captures", captures, "--out", tmp_path / "data")
    assert broken.returncode == 2 and "broken.json" in broken.stderr and broken.stderr.count("\n") == 1
    assert not (tmp_path / "data").exists()


def test_label_studio_config_is_the_shipped_one():
    manifest = Manifest.load(model_dir())
    shipped = (REPO_ROOT / "docs" / "label-studio.xml").read_text()
    assert shipped == labeling_config(valid_labels(manifest))
    assert ok_text(captures_cli("label-studio-config")) == shipped


def ok_text(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def annotate(task: dict, task_id: int, label: str | None, cancelled: bool = False) -> dict:
    """What Label Studio's JSON export holds for a task after an annotator submitted ``label``."""
    exported = {
        "id": task_id,
        "data": task["data"],
        "created_at": "2026-11-28T14:00:00.000000Z",
        "updated_at": "2026-11-28T14:05:00.000000Z",
        "project": 3,
        "annotations": [],
        "predictions": [
            {**prediction, "id": 900 + task_id, "created_ago": "5 minutes", "task": task_id}
            for prediction in task["predictions"]
        ],
    }
    if label is not None:
        exported["annotations"].append(
            {
                "id": 1000 + task_id,
                "completed_by": 1,
                "result": [
                    {
                        "id": f"r{task_id}",
                        "type": "choices",
                        "from_name": "label",
                        "to_name": "image",
                        "origin": "manual",
                        "value": {"choices": [label]},
                    }
                ],
                "was_cancelled": cancelled,
                "ground_truth": False,
                "created_at": "2026-11-28T14:04:00.000000Z",
                "updated_at": "2026-11-28T14:05:00.000000Z",
                "lead_time": 3.2,
                "result_count": 0,
                "task": task_id,
            }
        )
    return exported


def test_label_studio_round_trip(tmp_path: Path, model, photos):
    captures, tasks_file, export_file = tmp_path / "captures", tmp_path / "tasks.json", tmp_path / "export.json"
    capture_all(captures, model, photos, labelled=False)
    write_capture(captures, model, photos[0][0], capture_id="done1", when=DAY, label="cardboard")  # already labelled

    summary = ok(captures_cli("export", "--captures", captures, "--out", tasks_file, "--format", "label-studio"))
    tasks = json.loads(tasks_file.read_text())
    assert summary["tasks"] == len(tasks) == len(photos)  # the labelled capture is not asked again

    # The tasks follow the labeling config: the data key its <Image> reads, the names of its tags, its choices.
    config = ET.fromstring((REPO_ROOT / "docs" / "label-studio.xml").read_text())
    image_tag, choices_tag = config.find("Image"), config.find("Choices")
    choice_values = {c.get("value") for c in choices_tag.findall("Choice")}
    margins = []
    for task in tasks:
        assert set(task) == {"data", "predictions"}
        url = task["data"][image_tag.get("value").lstrip("$")]
        # Relative to Label Studio's document root, the folder that holds the capture folder.
        assert url.startswith(f"{LS_LOCAL_FILES}captures/") and (captures.parent / url[len(LS_LOCAL_FILES) :]).is_file()
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == f"{model.manifest.name} {model.manifest.version}"
        (result,) = prediction["result"]
        assert result["from_name"] == choices_tag.get("name") and result["to_name"] == image_tag.get("name")
        assert result["type"] == "choices" and result["value"]["choices"][0] in choice_values
        sidecar = read_capture(captures / "2026-11-28" / f"{task['data']['capture_id']}.json").sidecar
        expected = "trash" if sidecar.verdict == "anomalous" else sidecar.nearest_class
        assert result["value"]["choices"] == [expected]
        margins.append(prediction["score"])
    assert margins == sorted(margins) and len(set(margins)) > len(margins) // 2  # uncertain first, not constant

    truth = {f"c{i:03d}": label for i, (_, label) in enumerate(photos)}
    exported = []
    for n, task in enumerate(tasks):
        capture_id = task["data"]["capture_id"]
        if n == 0:
            exported.append(annotate(task, n + 1, None))  # nobody labelled it yet
        elif n == 1:
            exported.append(annotate(task, n + 1, "glass", cancelled=True))  # skipped by the annotator
        else:
            exported.append(annotate(task, n + 1, truth[capture_id]))
    export_file.write_text(json.dumps(exported, indent=2))

    counts = ok(captures_cli("import-label-studio", export_file, "--captures", captures))
    assert counts == {
        "tasks": len(tasks),
        "labelled": len(tasks) - 2,
        "unchanged": 0,
        "not_annotated": 2,
        "unknown_capture": 0,
    }
    for n, task in enumerate(tasks):
        sidecar = read_capture(captures / "2026-11-28" / f"{task['data']['capture_id']}.json").sidecar
        if n < 2:
            assert sidecar.label is None and sidecar.label_source is None
        else:
            assert sidecar.label == truth[task["data"]["capture_id"]]
            assert sidecar.label_source == "label-studio" and sidecar.labelled_at.endswith("Z")
    assert read_capture(captures / "2026-11-28" / "done1.json").sidecar.label_source == "feedback"
    assert not [p for p in captures.rglob(".*")]  # no temp file left behind

    again = ok(captures_cli("import-label-studio", export_file, "--captures", captures))
    assert again["labelled"] == 0 and again["unchanged"] == len(tasks) - 2

    folder = ok(captures_cli("export", "--captures", captures, "--out", tmp_path / "data", "--audit-share", "0"))
    assert folder["labelled"] == len(tasks) - 2 + 1


def test_import_rejects_a_label_outside_the_model(tmp_path: Path, model, photos):
    captures, export_file = tmp_path / "captures", tmp_path / "export.json"
    capture_all(captures, model, photos[:2], labelled=False)
    before = tree_files(captures)
    tasks = [
        {"id": 1, "data": {"image": f"{LS_LOCAL_FILES}2026-11-28/c000.jpg"}},
        {"id": 2, "data": {"image": f"{LS_LOCAL_FILES}2026-11-28/c001.jpg"}},
    ]
    export = [
        annotate({**tasks[0], "predictions": []}, 1, "cardboard"),
        annotate({**tasks[1], "predictions": []}, 2, "banana"),
    ]
    export_file.write_text(json.dumps(export))
    result = captures_cli("import-label-studio", export_file, "--captures", captures)
    assert result.returncode == 2 and "banana" in result.stderr and result.stderr.count("\n") == 1
    assert tree_files(captures) == before  # nothing written, not even the valid first label
    export_file.write_text('{"not": "a list"}')
    assert captures_cli("import-label-studio", export_file, "--captures", captures).returncode == 2
