"""``python -m flywheel.captures``: the bin's labelled captures -> training and audit trees, and Label Studio.

The capture store is written by the service and read here through the same contract module,
``service.capture_format`` (docs/capture-format.md), without torch, so this module also runs in the
serve image. Three commands:

* ``export``: labelled captures -> a class-folder tree for ``python -m training.fit --dataset folder``
  (one folder per label, the anomaly label included). A file is named by the sha256 of its bytes, so
  a re-export adds nothing and one photo sent twice is trained on once. A fixed share of the captures,
  chosen by a hash of the capture id (the same capture is always in it, whatever else was captured),
  is the audit set: written to ``--audit-out`` and never to the training tree, so the promotion gate
  (``flywheel.promote``) scores models on photos neither was trained on.
* ``export --format label-studio``: Label Studio import tasks with the model's verdict as a
  pre-annotation (Label Studio's documented ``data`` + ``predictions`` task format).
* ``import-label-studio``: a Label Studio JSON export (tasks with ``annotations[].result[].value.choices``)
  back onto the sidecars as labels (``label_source`` "label-studio").

Example:
    python -m flywheel.captures export --captures /var/lib/deepmad/captures --out data/bin \\
        --audit-out data/bin-audit
    python -m training.fit --dataset folder --data data/bin --normal cardboard,glass,metal,paper,plastic \\
        --out runs/bin-candidate
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError

from flywheel.errors import UserError, require_writable
from service.capture_format import Sidecar, SidecarError, read_sidecar, sidecar_paths, write_sidecar
from service.categories import MAX_CLASSES, MIN_AUDIT_PHOTOS, MIN_TRAIN_PHOTOS, CategoryError, check_name
from service.fileio import write_atomic
from service.label_studio import (  # the names the tasks, the labelling config and the importer share
    LS_IMAGE,
    LabelStudioError,
    choice_result,
    labeling_config,
    task_capture_id,
    task_choice,
)
from service.labels import anomaly_labels, valid_labels
from service.manifest import Manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "trashnet"
SHA_PREFIX = 16  # hex digits of the image sha256 in an exported file name (64 bits)
AUDIT_SALT = b"deepmad-audit-v1:"
DEFAULT_AUDIT_SHARE = 0.2
RETIRED = ".retired"  # <tree>/.retired/<class>: a retired class's photos, out of training and the gate
LS_LOCAL_FILES = "/data/local-files/?d="  # Label Studio's local-files URL, relative to LOCAL_FILES_DOCUMENT_ROOT


@dataclass(frozen=True)
class Capture:
    """One capture on disk: its typed sidecar and where its image lies."""

    sidecar_path: Path
    sidecar: Sidecar

    @property
    def id(self) -> str:
        return self.sidecar.id

    @property
    def image_path(self) -> Path:
        return self.sidecar_path.parent / self.sidecar.image

    @property
    def label(self) -> str | None:
        return self.sidecar.label

    @property
    def margin(self) -> float:
        return self.sidecar.margin


def anomaly_label(manifest: Manifest) -> str:
    """The label a verdict "anomalous" maps to (TrashNet: ``trash``)."""
    return anomaly_labels(manifest)[0]


def load_manifest(model_dir: Path) -> Manifest:
    try:
        return Manifest.load(model_dir)
    except FileNotFoundError:
        raise UserError(f"no manifest.json in {model_dir}; pass --model DIR (a model folder)") from None
    except ValidationError as exc:
        raise UserError(f"{model_dir}/manifest.json is not a valid manifest: {exc.errors()[0]['msg']}") from None


# ---- the capture store ----


def iter_captures(root: Path) -> Iterator[Capture]:
    """Every capture under ``root`` in (day, id) order; a capture exists iff its sidecar does."""
    if not root.is_dir():
        raise UserError(f"capture folder {root} does not exist (the service's --capture-dir)")
    for sidecar_path in sidecar_paths(root):
        yield read_capture(sidecar_path)


def read_capture(sidecar_path: Path) -> Capture:
    """One capture; a file that is not a sidecar is the user's error here (the service skips it)."""
    try:
        return Capture(sidecar_path, read_sidecar(sidecar_path))
    except SidecarError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"{sidecar_path}: not a capture sidecar ({exc})") from None


def in_audit(capture_id: str, share: float) -> bool:
    """Whether a capture belongs to the audit set: a hash of its id, so it never moves between exports."""
    digest = hashlib.sha256(AUDIT_SALT + capture_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


# ---- export to class folders ----


@dataclass
class TreeIndex:
    """The sha256-named files already in an export tree: sha prefix -> path."""

    root: Path
    files: dict[str, Path]

    @classmethod
    def scan(cls, root: Path) -> TreeIndex:
        files: dict[str, Path] = {}
        if root.is_dir():
            for folder in (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                for path in folder.iterdir():
                    if path.is_file() and not path.name.startswith(".") and len(path.stem) == SHA_PREFIX:
                        files[path.stem] = path
        return cls(root, files)


@dataclass
class _Placement:
    """Where one photo ends up after the export: its tree, its final path, and where it comes from (the
    capture's image for a new file, the tree's file for a move or a duplicate)."""

    tree: TreeIndex
    path: Path
    source: Path
    new: bool


def export_folders(
    captures: Path,
    out: Path,
    audit_out: Path | None,
    audit_share: float,
    manifest: Manifest,
    retire: list[str] | tuple[str, ...] = (),
    min_train: int = MIN_TRAIN_PHOTOS,
    min_audit: int = MIN_AUDIT_PHOTOS,
) -> dict[str, Any]:
    """Write labelled captures into ``out`` (and the audit share into ``audit_out``); return the counts.

    An image is stored once across both trees, under ``<label>/<sha256 prefix><ext>``: a photo already
    in either tree is not written again (so the same photo can never sit in training and audit), and a
    photo whose label changed since the last export is moved to its new label's folder.

    A label the model does not know is a new category (the label writers confirmed it: service.categories):
    it needs ``min_train`` photos in ``out`` and ``min_audit`` in ``audit_out``, and the classes after the
    export (the model's, less the retired ones, plus the new ones) at most ``MAX_CLASSES``. Every check
    runs before the first file is written. A retired class (``retire``, or a folder in ``<out>/.retired/``
    from an earlier retirement) has its captures left out and its folders moved to ``<tree>/.retired/``
    (hidden: no class for training or the gate); moving the folder back undoes it.
    """
    if not 0.0 <= audit_share < 1.0:
        raise UserError("--audit-share must lie in [0, 1)")
    if audit_out is not None and audit_out.resolve() == out.resolve():
        raise UserError("--audit-out must differ from --out: training must never read the audit photos")
    known = valid_labels(manifest)
    unknown_retired = [name for name in retire if name not in manifest.class_names]
    if unknown_retired:
        raise UserError(f"--retire {','.join(unknown_retired)}: not a class of the model ({manifest.class_names})")
    retired = [*retire, *(name for name in retired_classes(out) if name not in retire)]
    trees = [TreeIndex.scan(out)] + ([TreeIndex.scan(audit_out)] if audit_out else [])
    train_tree, audit_tree = trees[0], trees[1] if audit_out else None
    counts = {"labelled": 0, "unlabelled": 0, "written": 0, "audit_written": 0, "duplicates": 0, "relabelled": 0}
    counts.update(audit_held_back=0, retired=0)
    labelled = []
    for capture in iter_captures(captures):
        if capture.label is None:
            counts["unlabelled"] += 1
        elif capture.label in retired:
            counts["retired"] += 1
        else:
            if capture.label not in known:
                try:
                    check_name(capture.label)
                except CategoryError as exc:
                    raise UserError(
                        f"{capture.sidecar_path}: label {capture.label!r} is not the model's; {exc}"
                    ) from None
            labelled.append(capture)
    # The newest label of a photo wins when one photo was captured (and labelled) several times.
    labelled.sort(key=lambda c: (c.sidecar.labelled_at or "", c.sidecar.time))
    placed: dict[str, _Placement] = {
        key: _Placement(tree, path, path, False) for tree in reversed(trees) for key, path in tree.files.items()
    }
    for capture in labelled:
        counts["labelled"] += 1
        data = capture.image_path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != capture.sidecar.image_sha256:
            raise UserError(f"{capture.image_path}: its sha256 differs from the sidecar's (a damaged capture)")
        key = digest[:SHA_PREFIX]
        audit = in_audit(capture.id, audit_share)
        existing = placed.get(key)
        if existing is not None:
            if existing.path.parent.name == capture.label:
                counts["duplicates"] += 1
            else:
                existing.path = existing.tree.root / capture.label / existing.path.name
                counts["relabelled"] += 1
            continue
        if audit and audit_tree is None:
            counts["audit_held_back"] += 1
            continue
        tree = audit_tree if audit else train_tree
        suffix = capture.image_path.suffix.lower() or ".bin"
        placed[key] = _Placement(tree, tree.root / capture.label / f"{key}{suffix}", capture.image_path, True)
        counts["audit_written" if audit else "written"] += 1
    new = sorted({c.label for c in labelled if c.label not in known})
    per_class = {name: {"train": 0, "audit": 0} for name in new}
    for placement in placed.values():
        name = placement.path.parent.name
        if name in per_class:
            per_class[name]["audit" if placement.tree is audit_tree else "train"] += 1
    classes = [name for name in manifest.class_names if name not in retired] + new
    _check_classes(classes, per_class, audit_out is not None, min_train, min_audit)
    for key, placement in placed.items():
        if placement.new:
            write_atomic(placement.path, placement.source.read_bytes())
        elif placement.path != placement.source:
            placement.path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(placement.source, placement.path)
        placement.tree.files[key] = placement.path
    for name in retired:
        for tree in trees:
            _retire_folder(tree.root, name)
    return {**counts, "classes": classes, "new_categories": per_class, "retired_classes": retired}


def _check_classes(
    classes: list[str], per_class: dict[str, dict[str, int]], has_audit: bool, min_train: int, min_audit: int
) -> None:
    """The class count and each new category's photos, before anything is written (UserError)."""
    if not classes:
        raise UserError("--retire leaves the model no class to serve")
    if len(classes) > MAX_CLASSES:
        raise UserError(
            f"{len(classes)} classes after this export ({', '.join(classes)}); a model serves at most "
            f"{MAX_CLASSES}: relabel a new category's captures or retire a class (--retire)"
        )
    for name, found in per_class.items():
        if not has_audit:
            raise UserError(f"new category {name!r} is judged on the audit tree: pass --audit-out")
        if found["train"] < min_train or found["audit"] < min_audit:
            raise UserError(
                f"new category {name!r} has {found['train']} photos for training (at least {min_train}) and "
                f"{found['audit']} for the audit (at least {min_audit}): label more photos of it, or relabel them"
            )


def retired_classes(out: Path) -> list[str]:
    """The classes retired in an export tree (``<out>/.retired/<class>``), sorted."""
    folder = out / RETIRED
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _retire_folder(root: Path, name: str) -> None:
    """``<root>/<name>`` -> ``<root>/.retired/<name>`` (merged into an earlier retirement of the class)."""
    folder = root / name
    if not folder.is_dir():
        return
    target = root / RETIRED / name
    target.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        os.replace(path, target / path.name)
    folder.rmdir()


# ---- Label Studio ----


def local_files_prefix(captures: Path) -> str:
    """The image URL prefix when Label Studio's document root is the folder that holds ``captures``.

    Label Studio refuses a Local Files storage on the document root itself, so the storage is the capture
    folder, one level down, and each URL names the capture folder before ``<day>/<id>.<ext>``.
    """
    return f"{LS_LOCAL_FILES}{quote(Path(os.path.abspath(captures)).name)}/"


def label_studio_tasks(
    captures: Path, manifest: Manifest, url_prefix: str, include_labelled: bool
) -> list[dict[str, Any]]:
    """Import tasks, the most uncertain first; each prediction is the model's answer as a choice.

    ``score`` is the prediction's confidence as Label Studio reads it (its Data Manager shows the lowest
    first): |score - threshold| of the capture, so the items nearest gamma come up first.
    """
    anomalous = anomaly_label(manifest)
    chosen = [c for c in iter_captures(captures) if include_labelled or c.label is None]
    tasks = []
    for capture in sorted(chosen, key=lambda c: c.margin):
        side = capture.sidecar
        predicted = side.nearest_class if side.verdict == "normal" else anomalous  # no_item: not a recyclable
        relative = capture.image_path.relative_to(captures).as_posix()
        tasks.append(
            {
                "data": {
                    LS_IMAGE: f"{url_prefix}{relative}",
                    "capture_id": capture.id,
                    "deepmad_score": side.score,
                    "deepmad_threshold": side.threshold,
                    "deepmad_verdict": side.verdict,
                },
                "predictions": [
                    {
                        "model_version": f"{side.model.name} {side.model.version}",
                        "score": round(capture.margin, 6),
                        "result": choice_result(predicted),
                    }
                ],
            }
        )
    return tasks


def import_label_studio(export_file: Path, captures: Path, labels: list[str]) -> dict[str, int]:
    """Apply an export's labels to the sidecars; every label is checked before any sidecar is written."""
    try:
        tasks = json.loads(export_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{export_file} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{export_file} is not JSON: {exc}") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise UserError(f"{export_file} is not a Label Studio JSON export (a list of tasks)")
    by_id = {capture.id: capture for capture in iter_captures(captures)}
    counts = {"tasks": len(tasks), "labelled": 0, "unchanged": 0, "not_annotated": 0, "unknown_capture": 0}
    updates: list[tuple[Capture, str]] = []
    for task in tasks:
        try:
            label = task_choice(task)
        except LabelStudioError as exc:
            raise UserError(str(exc)) from None
        if label is None:
            counts["not_annotated"] += 1
            continue
        if label not in labels:
            raise UserError(f"task {task.get('id')}: label {label!r} is not one of {labels}")
        capture = by_id.get(task_capture_id(task) or "")
        if capture is None:
            counts["unknown_capture"] += 1
            continue
        updates.append((capture, label))
    for capture, label in updates:
        if capture.label == label and capture.sidecar.label_source == "label-studio":
            counts["unchanged"] += 1
            continue
        write_sidecar(capture.sidecar_path, capture.sidecar.with_label(label, "label-studio"))
        counts["labelled"] += 1
    return counts


# ---- CLI ----


def _class_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flywheel.captures", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="labelled captures -> class folders, or Label Studio tasks")
    export.add_argument("--captures", type=Path, required=True, help="the service's capture folder")
    export.add_argument(
        "--out", type=Path, required=True, help="class-folder tree (merged into), or the tasks JSON file"
    )
    export.add_argument("--audit-out", type=Path, help="class-folder tree for the audit share (never trained on)")
    export.add_argument(
        "--audit-share",
        type=float,
        default=DEFAULT_AUDIT_SHARE,
        help="share of captures (by a hash of the id) kept for the audit tree; without --audit-out they are "
        "held back from training all the same",
    )
    export.add_argument("--format", choices=["folder", "label-studio"], default="folder")
    export.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder whose labels are valid")
    export.add_argument(
        "--image-url-prefix",
        help="label-studio: prefix of each task's image URL before the path inside --captures (default: Label "
        "Studio's local files, /data/local-files/?d=<capture folder name>/, with "
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT set to the folder that holds the capture folder)",
    )
    export.add_argument("--include-labelled", action="store_true", help="label-studio: also labelled captures")
    export.add_argument(
        "--retire",
        type=_class_list,
        default=[],
        metavar="CLASS[,CLASS]",
        help="classes of the model to retire: their captures are left out and their folders move to "
        f"<tree>/{RETIRED}/ (later exports keep them out; move the folder back to undo)",
    )
    export.add_argument(
        "--min-train-photos",
        type=_at_least_one,
        default=MIN_TRAIN_PHOTOS,
        help="photos a new category needs in the training tree (fewer: exit 2, nothing written)",
    )
    export.add_argument(
        "--min-audit-photos",
        type=_at_least_one,
        default=MIN_AUDIT_PHOTOS,
        help="photos a new category needs in the audit tree, to be judged by the gate",
    )
    imports = commands.add_parser("import-label-studio", help="apply a Label Studio JSON export as labels")
    imports.add_argument("export_file", type=Path, metavar="EXPORT.json")
    imports.add_argument("--captures", type=Path, required=True)
    imports.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder whose labels are valid")
    config = commands.add_parser("label-studio-config", help="print the labeling config (docs/label-studio.xml)")
    config.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    return parser


def run(args: argparse.Namespace) -> dict[str, Any] | str:
    manifest = load_manifest(args.model)
    labels = valid_labels(manifest)
    if args.command == "label-studio-config":
        return labeling_config(labels)
    if args.command == "import-label-studio":
        return import_label_studio(args.export_file, args.captures, labels)
    if args.format == "label-studio":
        require_writable("--out", args.out.parent)
        prefix = args.image_url_prefix if args.image_url_prefix is not None else local_files_prefix(args.captures)
        tasks = label_studio_tasks(args.captures, manifest, prefix, args.include_labelled)
        write_atomic(args.out, (json.dumps(tasks, indent=2) + "\n").encode("utf-8"))
        return {"tasks": len(tasks), "out": str(args.out)}
    require_writable("--out", args.out)
    if args.audit_out is not None:
        require_writable("--audit-out", args.audit_out)
    counts = export_folders(
        args.captures,
        args.out,
        args.audit_out,
        args.audit_share,
        manifest,
        args.retire,
        args.min_train_photos,
        args.min_audit_photos,
    )
    return {**counts, "out": str(args.out), "audit_out": str(args.audit_out) if args.audit_out else None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        result if isinstance(result, str) else json.dumps(result, indent=2), end="" if isinstance(result, str) else "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
