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
from urllib.parse import parse_qs, quote, urlparse
from xml.sax.saxutils import quoteattr

from pydantic import ValidationError

from flywheel.errors import UserError, require_writable
from service.capture_format import Sidecar, SidecarError, read_sidecar, sidecar_paths, write_sidecar
from service.fileio import write_atomic
from service.labels import anomaly_labels, valid_labels
from service.manifest import Manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "trashnet"
SHA_PREFIX = 16  # hex digits of the image sha256 in an exported file name (64 bits)
AUDIT_SALT = b"deepmad-audit-v1:"
DEFAULT_AUDIT_SHARE = 0.2
# Names shared by the labeling config (docs/label-studio.xml), the tasks and the importer.
LS_IMAGE = "image"  # <Image name="image" value="$image"/>
LS_CHOICES = "label"  # <Choices name="label" toName="image">
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


def export_folders(
    captures: Path, out: Path, audit_out: Path | None, audit_share: float, labels: list[str]
) -> dict[str, int]:
    """Write labelled captures into ``out`` (and the audit share into ``audit_out``); return the counts.

    An image is stored once across both trees, under ``<label>/<sha256 prefix><ext>``: a photo already
    in either tree is not written again (so the same photo can never sit in training and audit), and a
    photo whose label changed since the last export is moved to its new label's folder.
    """
    if not 0.0 <= audit_share < 1.0:
        raise UserError("--audit-share must lie in [0, 1)")
    if audit_out is not None and audit_out.resolve() == out.resolve():
        raise UserError("--audit-out must differ from --out: training must never read the audit photos")
    trees = {"train": TreeIndex.scan(out), "audit": TreeIndex.scan(audit_out) if audit_out else None}
    counts = {"labelled": 0, "unlabelled": 0, "written": 0, "audit_written": 0, "duplicates": 0, "relabelled": 0}
    counts["audit_held_back"] = 0
    labelled = []
    for capture in iter_captures(captures):
        if capture.label is None:
            counts["unlabelled"] += 1
            continue
        if capture.label not in labels:
            raise UserError(f"{capture.sidecar_path}: label {capture.label!r} is not one of {labels}")
        labelled.append(capture)
    # The newest label of a photo wins when one photo was captured (and labelled) several times.
    labelled.sort(key=lambda c: (c.sidecar.labelled_at or "", c.sidecar.time))
    for capture in labelled:
        counts["labelled"] += 1
        data = capture.image_path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != capture.sidecar.image_sha256:
            raise UserError(f"{capture.image_path}: its sha256 differs from the sidecar's (a damaged capture)")
        key = digest[:SHA_PREFIX]
        audit = in_audit(capture.id, audit_share)
        target_tree = trees["audit"] if audit else trees["train"]
        existing = next((tree for tree in trees.values() if tree is not None and key in tree.files), None)
        if audit and target_tree is None:
            counts["audit_held_back"] += 1
            continue
        if existing is not None:
            current = existing.files[key]
            if current.parent.name == capture.label:
                counts["duplicates"] += 1
            else:
                moved = existing.root / capture.label / current.name
                moved.parent.mkdir(parents=True, exist_ok=True)
                os.replace(current, moved)
                existing.files[key] = moved
                counts["relabelled"] += 1
            continue
        suffix = capture.image_path.suffix.lower() or ".bin"
        path = target_tree.root / capture.label / f"{key}{suffix}"
        write_atomic(path, data)
        target_tree.files[key] = path
        counts["audit_written" if audit else "written"] += 1
    return counts


# ---- Label Studio ----


def labeling_config(labels: list[str]) -> str:
    """The Label Studio labeling config the tasks and the importer assume: one image, one single choice."""
    choices = "\n".join(f"    <Choice value={quoteattr(label)}/>" for label in labels)
    return (
        "<View>\n"
        f'  <Image name="{LS_IMAGE}" value="${LS_IMAGE}"/>\n'
        f'  <Choices name="{LS_CHOICES}" toName="{LS_IMAGE}" choice="single" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


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
                        "result": [
                            {
                                "from_name": LS_CHOICES,
                                "to_name": LS_IMAGE,
                                "type": "choices",
                                "value": {"choices": [predicted]},
                            }
                        ],
                    }
                ],
            }
        )
    return tasks


def _task_capture_id(task: dict[str, Any]) -> str | None:
    """The capture a task is about: ``data.capture_id``, else the image file's stem in ``data.image``."""
    data = task.get("data") or {}
    if isinstance(data.get("capture_id"), str):
        return data["capture_id"]
    url = data.get(LS_IMAGE)
    if not isinstance(url, str) or not url:
        return None
    parsed = urlparse(url)
    path = parse_qs(parsed.query).get("d", [parsed.path])[0]
    return Path(path).stem or None


def _annotation_choice(task: dict[str, Any]) -> str | None:
    """The label of a task's newest annotation that was not cancelled (None when nobody labelled it)."""
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    annotations.sort(key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
    for annotation in reversed(annotations):
        for result in annotation.get("result") or []:
            if result.get("from_name") != LS_CHOICES or result.get("type") != "choices":
                continue
            choices = (result.get("value") or {}).get("choices") or []
            if len(choices) == 1 and isinstance(choices[0], str):
                return choices[0]
            raise UserError(f"task {task.get('id')}: the annotation must hold exactly one choice, got {choices}")
    return None


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
        label = _annotation_choice(task)
        if label is None:
            counts["not_annotated"] += 1
            continue
        if label not in labels:
            raise UserError(f"task {task.get('id')}: label {label!r} is not one of {labels}")
        capture = by_id.get(_task_capture_id(task) or "")
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
    counts = export_folders(args.captures, args.out, args.audit_out, args.audit_share, labels)
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
