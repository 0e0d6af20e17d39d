"""``python -m flywheel.promote``: score a candidate model against the current one on the audit photos,
swap it in only when it is not worse, reload the running service, and roll back on request.

Both artifacts are scored with ONNX Runtime through the service's own loader and image function (no
torch), on the same audit class-folder tree (``flywheel.captures export --audit-out``: photos neither
model was trained on). Printed side by side: AUC (recyclables vs the anomaly label), TPR at the current
model's normal-reject rate (each model thresholded at the score that rejects as many audit normals as
the current model's gamma does), TPR and reject rate at each model's own gamma, routing accuracy (the
nearest class of normal items), and per class.

The rule (RULE below): the candidate is promoted only when it has the same anomaly label, drops no
class unless told to (--retire CLASS), its scores are not constant, and on the photos of the classes
both models serve plus the anomaly photos: its AUC >= the current AUC + --min-gain, its routing
accuracy >= the current one - --routing-tolerance, each shared class's routing >= the current one -
--class-routing-tolerance (a class with fewer than --min-class-photos audit photos is left to the
overall number), and, at each model's own gamma (what the bin acts on), its normal-reject rate is at
most --reject-tolerance (0.05) above the current model's and above its own manifest's claim, and its
trash caught at most --catch-tolerance (0.05) below the current model's (decide_at_gamma): a candidate
with the same AUC but a gamma that rejects every recyclable, or passes every trash item, is refused. A
class the candidate adds (a new category from the operators' labels) is judged on its own audit photos,
which only the candidate can route: it must route at least --min-new-routing of them to the new
class, and with fewer than --min-class-photos of them it is not judged at all (exit 2). A retired
class's audit photos are reported for the current model and judge nothing. An audit tree with fewer than
--min-audit-anomalies anomaly photos (default 5) is not judged at all: on one or two photos the AUC is
a coin flip (bench/flywheel.py measured a gate decided by a single audit trash photo). Exit 0 promoted
(or rolled back), 3 refused (the reason is printed), 2 bad input or an audit tree too small to judge,
1 when the swap happened but the service's reload failed (the service keeps its old model).

One promotion or rollback at a time per model folder: the store's lock (ModelStore.locked) is taken
before the current model is read and held through the decision, the swap and the reload, so of two runs
started together the second is judged against the model the first swapped in.

Example:
    python -m flywheel.promote --candidate runs/bin-candidate --current models/trashnet \\
        --audit data/bin-audit --reload-url http://127.0.0.1:8000
    python -m flywheel.promote --current models/trashnet --rollback --reload-url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.errors import UserError, require_artifact
from flywheel.metrics import roc_auc, threshold_rejecting
from flywheel.model_store import ModelStore, check_artifact
from flywheel.photo_cache import EntryStore, cached_rows, decoded_files, file_key
from service.categories import MIN_AUDIT_PHOTOS
from service.imaging import ImageError, image_files, load_image_file
from service.labels import anomaly_labels
from service.model import LoadedModel, ModelLoadError, load_model
from service.settings import Settings

EXIT_PROMOTED, EXIT_RELOAD_FAILED, EXIT_BAD_INPUT, EXIT_REFUSED = 0, 1, 2, 3
BATCH = 64
RULE = (
    "promote iff the same anomaly label, no class dropped unless retired (--retire), non-constant audit scores; "
    "on the classes both serve and the anomaly photos: AUC >= current AUC + min_gain, routing accuracy >= "
    "current - routing_tolerance, each class's routing >= current - class_routing_tolerance (classes with at "
    "least min_class_photos audit photos), and at each model's own gamma: normal-reject rate <= current + "
    "reject_tolerance and <= its manifest's claim + reject_tolerance, trash caught >= current - catch_tolerance; "
    "each new class routes at least min_new_routing of its own audit photos (at least min_class_photos) to itself"
)


@dataclass(frozen=True)
class AuditSet:
    """The audit photos: file, label, and whether the label is the anomaly label."""

    files: list[Path]
    labels: list[str]
    anomalous: np.ndarray

    @classmethod
    def read(cls, root: Path, normal: list[str], anomaly: list[str]) -> AuditSet:
        """``normal``: the classes of either model (a new class's photos judge the candidate alone)."""
        if not root.is_dir():
            raise UserError(f"audit folder {root} does not exist (flywheel.captures export --audit-out)")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        unknown = [p.name for p in folders if p.name not in normal + anomaly]
        if unknown:
            raise UserError(f"audit folders {unknown} are not labels of either model ({normal + anomaly})")
        files, labels = [], []
        for folder in folders:
            found = image_files(folder)
            files += found
            labels += [folder.name] * len(found)
        anomalous = np.isin(labels, anomaly)
        if not anomalous.any() or anomalous.all():
            raise UserError(
                f"{root} needs normal and {'/'.join(anomaly)} photos to compare models; it has {len(files)}"
            )
        return cls(files, labels, anomalous)

    def counts(self) -> dict[str, int]:
        names, counts = np.unique(self.labels, return_counts=True)
        return {str(n): int(c) for n, c in zip(names, counts, strict=True)}

    def only(self, labels: list[str]) -> AuditSet:
        """The photos of these labels (the classes both models serve, or one model's own)."""
        keep = np.isin(self.labels, labels)
        files = [f for f, k in zip(self.files, keep, strict=True) if k]
        return AuditSet(files, [name for name, k in zip(self.labels, keep, strict=True) if k], self.anomalous[keep])


def open_model(flag: str, folder: Path) -> LoadedModel:
    """The artifact as the service would load it (sha256-checked, warmed up), on the CPU."""
    require_artifact(flag, folder)
    # One session: the gate scores batches one at a time, so the service's second (busy) session and its golden
    # check would only cost load time.
    settings = Settings(model_dir=folder, threshold=None, providers=["CPUExecutionProvider"], busy_intra_op_threads=0)
    try:
        return load_model(folder, settings)
    except ModelLoadError as exc:
        raise UserError(f"{flag}: {exc}") from None


def score(model: LoadedModel, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(score, nearest class index) for every file, through the service's image function.

    Cached per photo (``flywheel.photo_cache``): the decoded photo by its file's content, and the outputs by
    the graph's sha256, engine and providers too. The audit tree only grows, so a gate after 50 new captures
    runs the current model (usually the last round's candidate) on the new audit photos only; the candidate
    runs on all of them, as it must."""
    shape = model.input_shape

    def decode(path: Path) -> np.ndarray:
        try:
            return load_image_file(path, *shape)
        except ImageError as exc:
            raise UserError(f"an audit photo cannot be read: {exc.message}") from None

    def run(indices: list[int]) -> np.ndarray:
        photos = decoded_files([files[i] for i in indices], shape, decode)
        rows = []
        for start in range(0, len(photos), BATCH):
            result = model.run(photos[start : start + BATCH])
            rows.append(np.stack([result.score, result.nearest], axis=1).astype(np.float64))
        return np.concatenate(rows)

    graph = f"{model.manifest.model_sha256}|{model.engine}|{','.join(model.providers)}|"
    keys = [hashlib.sha256((graph + file_key(path, shape)).encode()).hexdigest()[:40] for path in files]
    rows, _ = cached_rows(EntryStore("audit-scores"), keys, run)
    return rows[:, 0], rows[:, 1].astype(np.int64)


def audit_metrics(model: LoadedModel, audit: AuditSet, n_reject: int | None) -> dict[str, Any]:
    """The gate's numbers for one model; ``n_reject``: audit normals to reject (None: as this model's gamma)."""
    scores, nearest = score(model, audit.files)
    normal = ~audit.anomalous
    gamma = model.threshold
    if n_reject is None:
        n_reject = int((scores[normal] >= gamma).sum())
    matched = threshold_rejecting(scores[normal], n_reject)
    routed = routed_names(model, nearest)
    labels = np.asarray(audit.labels)
    return {
        "model": {
            "name": model.manifest.name,
            "version": model.manifest.version,
            "sha256": model.manifest.model_sha256,
        },
        "auc": roc_auc(scores, audit.anomalous),
        "gamma": gamma,
        "normal_reject_rate_at_gamma": float((scores[normal] >= gamma).mean()),
        "claimed_reject_rate": model.manifest.threshold.normal_reject_rate,
        "tpr_at_gamma": float((scores[audit.anomalous] >= gamma).mean()),
        "n_reject_matched": n_reject,
        "threshold_matched": matched,
        "tpr_at_matched_reject": float((scores[audit.anomalous] >= matched).mean()),
        "routing_accuracy": float((routed[normal] == labels[normal]).mean()),
        "score_std": float(scores.std()),
        "per_class": per_class(audit, scores, routed, gamma),
    }


def routed_names(model: LoadedModel, nearest: np.ndarray) -> np.ndarray:
    names = model.manifest.class_names
    return np.array([names[i] if 0 <= i < len(names) else "" for i in nearest])


def per_class(audit: AuditSet, scores: np.ndarray, routed: np.ndarray, gamma: float) -> dict[str, dict[str, Any]]:
    """Per label: photos, share flagged at gamma, and for a class the share routed to it."""
    labels = np.asarray(audit.labels)
    found = {}
    for label in sorted(set(audit.labels)):
        rows = labels == label
        entry = {"n": int(rows.sum()), "flagged_at_gamma": float((scores[rows] >= gamma).mean())}
        if not audit.anomalous[rows][0]:
            entry["routing_accuracy"] = float((routed[rows] == label).mean())
        found[label] = entry
    return found


def own_classes(model: LoadedModel, audit: AuditSet) -> dict[str, dict[str, Any]]:
    """Per class that only this model serves (a new class, a retired one): its audit photos' numbers."""
    if not audit.files:
        return {}
    scores, nearest = score(model, audit.files)
    return per_class(audit, scores, routed_names(model, nearest), model.threshold)


@dataclass(frozen=True)
class Gate:
    """The rule's tolerances (the command's flags)."""

    min_gain: float = 0.0
    routing_tolerance: float = 0.02
    class_routing_tolerance: float = 0.10
    catch_tolerance: float = 0.05
    reject_tolerance: float = 0.05
    min_class_photos: int = MIN_AUDIT_PHOTOS
    min_new_routing: float = 0.5


@dataclass(frozen=True)
class ClassChange:
    """The candidate's classes against the current model's: kept (both serve them), new, retired."""

    kept: list[str]
    new: list[str]
    retired: list[str]

    @classmethod
    def between(cls, current: list[str], candidate: list[str]) -> ClassChange:
        return cls(
            [c for c in current if c in candidate],
            [c for c in candidate if c not in current],
            [c for c in current if c not in candidate],
        )


def decide(current: dict, candidate: dict, change: ClassChange, retire: list[str], gate: Gate) -> str | None:
    """None when the candidate may be promoted, else the reason it is refused. ``current`` and ``candidate``
    are measured on the kept classes and the anomaly label; ``candidate["new_classes"]`` on the new ones."""
    dropped = [name for name in change.retired if name not in retire]
    if dropped:
        return f"the candidate no longer serves {dropped}: pass --retire {','.join(dropped)} to retire them"
    if candidate["score_std"] < 1e-6:
        return "the candidate gives every audit photo the same score"
    if candidate["auc"] < current["auc"] + gate.min_gain:
        return f"AUC {candidate['auc']:.4f} < current {current['auc']:.4f} + min gain {gate.min_gain:g}"
    if candidate["routing_accuracy"] < current["routing_accuracy"] - gate.routing_tolerance:
        return (
            f"routing accuracy {candidate['routing_accuracy']:.4f} < current "
            f"{current['routing_accuracy']:.4f} - tolerance {gate.routing_tolerance:g}"
        )
    for name in change.kept:
        before, after = current["per_class"].get(name), candidate["per_class"].get(name)
        if before is None or after is None or before["n"] < gate.min_class_photos:
            continue
        if after["routing_accuracy"] < before["routing_accuracy"] - gate.class_routing_tolerance:
            return (
                f"{name} routing {after['routing_accuracy']:.4f} < current {before['routing_accuracy']:.4f} "
                f"- class tolerance {gate.class_routing_tolerance:g} (n={before['n']})"
            )
    for name, entry in candidate.get("new_classes", {}).items():
        if entry["routing_accuracy"] < gate.min_new_routing:
            return (
                f"new class {name} routes {entry['routing_accuracy']:.4f} of its {entry['n']} audit photos to "
                f"itself < --min-new-routing {gate.min_new_routing:g}"
            )
    return decide_at_gamma(current, candidate, gate)


def decide_at_gamma(current: dict, candidate: dict, gate: Gate) -> str | None:
    """The bin acts on gamma, not on AUC: a candidate whose own gamma rejects or misses far more is refused."""
    reject, catch = "normal_reject_rate_at_gamma", "tpr_at_gamma"
    claimed = candidate.get("claimed_reject_rate")
    if claimed is not None and candidate[reject] > claimed + gate.reject_tolerance:
        return (
            f"normal-reject rate at gamma {candidate[reject]:.4f} > its manifest's own claim {claimed:.4f} "
            f"+ tolerance {gate.reject_tolerance:g}"
        )
    if candidate[reject] > current[reject] + gate.reject_tolerance:
        return (
            f"normal-reject rate at gamma {candidate[reject]:.4f} > current {current[reject]:.4f} "
            f"+ tolerance {gate.reject_tolerance:g}"
        )
    if candidate[catch] < current[catch] - gate.catch_tolerance:
        return (
            f"trash caught at gamma {candidate[catch]:.4f} < current {current[catch]:.4f} "
            f"- tolerance {gate.catch_tolerance:g}"
        )
    return None


def table(current: dict, candidate: dict, audit: AuditSet, anomaly: str) -> str:
    n_normal = int((~audit.anomalous).sum())
    rate = current["n_reject_matched"] / n_normal
    rows = [
        ("model", f"{current['model']['name']} {current['model']['version']}", None),
        ("AUC (recyclables vs " + anomaly + ")", "auc", "{:.4f}"),
        (f"TPR at normal-reject {rate:.3f}", "tpr_at_matched_reject", "{:.3f}"),
        ("  its threshold", "threshold_matched", "{:.4g}"),
        ("routing accuracy", "routing_accuracy", "{:.3f}"),
        ("gamma", "gamma", "{:.4g}"),
        ("  normal-reject rate at gamma", "normal_reject_rate_at_gamma", "{:.3f}"),
        ("  TPR at gamma", "tpr_at_gamma", "{:.3f}"),
    ]
    lines = [f"{'':38}{'current':>16}{'candidate':>16}"]
    for title, key, fmt in rows:
        if fmt is None:
            left = f"{current['model']['version']}"
            right = f"{candidate['model']['version']}"
            lines.append(f"{'model version':38}{left:>16}{right:>16}")
            continue
        lines.append(f"{title:38}{fmt.format(current[key]):>16}{fmt.format(candidate[key]):>16}")
    both = [(label, entry, candidate["per_class"][label]) for label, entry in current["per_class"].items()]
    only = [(label, None, entry, "new") for label, entry in candidate.get("new_classes", {}).items()]
    only += [(label, entry, None, "retired") for label, entry in current.get("retired_classes", {}).items()]
    for label, left_entry, right_entry, *kind in [*both, *only]:
        n = (left_entry or right_entry)["n"]
        suffix = f", {kind[0]}" if kind else ""
        if "routing_accuracy" in (left_entry or right_entry):
            name = f"{label} (n={n}{suffix}) routed / rejected"
            left, right = (_routed(entry) for entry in (left_entry, right_entry))
        else:
            name = f"{label} (n={n}) flagged at gamma"
            left, right = f"{left_entry['flagged_at_gamma']:.2f}", f"{right_entry['flagged_at_gamma']:.2f}"
        lines.append(f"{name:38}{left:>16}{right:>16}")
    return "\n".join(lines)


def _routed(entry: dict | None) -> str:
    return "-" if entry is None else f"{entry['routing_accuracy']:.2f} / {entry['flagged_at_gamma']:.2f}"


def reload_service(url: str, expected_version: str) -> dict[str, Any]:
    """POST /admin/reload with DEEPMAD_ADMIN_TOKEN; the service must answer with ``expected_version``."""
    token = os.environ.get("DEEPMAD_ADMIN_TOKEN", "")
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/admin/reload"):
        endpoint += "/admin/reload"
    request = urllib.request.Request(endpoint, method="POST", data=b"", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        return {"ok": False, "url": endpoint, "status": exc.code, "error": detail}
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
        return {"ok": False, "url": endpoint, "error": str(exc)}
    version = (body.get("model") or {}).get("version")
    return {"ok": version == expected_version, "url": endpoint, "status": 200, "serving": version}


def base_record(decision: str, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "decision": decision,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "current": str(args.current),
        "command": "python -m flywheel.promote " + " ".join(sys.argv[1:]),
    }


def run_rollback(args: argparse.Namespace, store: ModelStore) -> int:
    """Switch back and reload under the lock, so a promotion cannot slip in between the two."""
    with store.locked():
        rolled_from, rolled_to = store.rollback()
        manifest = check_artifact(store.current)
        record = {**base_record("rolled-back", args), "from_version": rolled_from, "to_version": rolled_to}
        record["model"] = {"name": manifest.name, "version": manifest.version, "sha256": manifest.model_sha256}
        print(f"rolled back {store.current}: version folder {rolled_from} -> {rolled_to} ({manifest.version})")
        return finish(args, store, record, manifest.version)


def finish(args: argparse.Namespace, store: ModelStore, record: dict[str, Any], version: str) -> int:
    code = EXIT_PROMOTED
    if args.reload_url:
        record["reload"] = reload_service(args.reload_url, version)
        if record["reload"]["ok"]:
            print(f"reloaded {record['reload']['url']}: serving {version}")
        else:
            print(f"error: reload failed, the service keeps its old model: {record['reload']}", file=sys.stderr)
            code = EXIT_RELOAD_FAILED
    print(f"decision record: {store.record(record)}")
    return code


def run(args: argparse.Namespace) -> int:
    if not args.current.exists():
        raise UserError(f"--current {args.current} does not exist (the folder the service serves)")
    store = ModelStore(args.current)
    if args.reload_url and not os.environ.get("DEEPMAD_ADMIN_TOKEN"):
        raise UserError("--reload-url needs the service's admin token in DEEPMAD_ADMIN_TOKEN")
    if args.rollback:
        return run_rollback(args, store)
    if args.candidate is None or args.audit is None:
        raise UserError("--candidate and --audit are required (or --rollback)")
    if args.candidate.resolve() == args.current.resolve():
        raise UserError("--candidate is the current model folder")
    # Locked before the current model is read: a promotion that ran meanwhile is what this one is judged against.
    with store.locked():
        return run_promotion(args, store)


def run_promotion(args: argparse.Namespace, store: ModelStore) -> int:
    """Score, decide, swap and reload; the caller holds the store's lock throughout."""
    current_model, candidate_model = open_model("--current", args.current), open_model("--candidate", args.candidate)
    gate = Gate(
        args.min_gain,
        args.routing_tolerance,
        args.class_routing_tolerance,
        args.catch_tolerance,
        args.reject_tolerance,
        args.min_class_photos,
        args.min_new_routing,
    )
    anomaly = anomaly_labels(current_model.manifest)
    change = ClassChange.between(current_model.manifest.class_names, candidate_model.manifest.class_names)
    record = {
        **base_record("refused", args),
        "candidate": str(args.candidate),
        "rule": RULE,
        "gate": dataclasses.asdict(gate),
        "classes": {**dataclasses.asdict(change), "retire": args.retire},
    }
    if anomaly_labels(candidate_model.manifest) != anomaly:
        return refuse(
            store,
            record,
            f"the candidate's anomaly label(s) {anomaly_labels(candidate_model.manifest)} "
            f"differ from the current model's {anomaly}",
        )
    wrong = [name for name in args.retire if name not in change.retired]
    if wrong:
        raise UserError(f"--retire {','.join(wrong)}: not a class the current model serves and the candidate drops")
    everything = AuditSet.read(args.audit, [*current_model.manifest.class_names, *change.new], anomaly)
    counts = everything.counts()
    unjudged = {name: counts.get(name, 0) for name in change.new if counts.get(name, 0) < gate.min_class_photos}
    if unjudged:
        raise UserError(
            f"{args.audit} holds {unjudged} photos of the candidate's new classes; the gate judges a new class on "
            f"at least {gate.min_class_photos} (--min-class-photos): label more of them"
        )
    audit = everything.only([*change.kept, *anomaly])
    if audit.anomalous.all():
        raise UserError(f"{args.audit} holds no photos of a class both models serve ({change.kept})")
    if int(audit.anomalous.sum()) < args.min_audit_anomalies:
        raise UserError(
            f"{args.audit} holds {int(audit.anomalous.sum())} {'/'.join(anomaly)} photos; the gate compares models "
            f"on at least {args.min_audit_anomalies} (--min-audit-anomalies): label more or raise --audit-share"
        )
    current = audit_metrics(current_model, audit, None)
    candidate = audit_metrics(candidate_model, audit, current["n_reject_matched"])
    candidate["new_classes"] = own_classes(candidate_model, everything.only(change.new))
    current["retired_classes"] = own_classes(current_model, everything.only(change.retired))
    print(f"audit {args.audit}: {counts}")
    if change.new or change.retired:
        print(f"classes: new {change.new}, retired {change.retired}, kept {change.kept}")
    print(table(current, candidate, audit, "/".join(anomaly)))
    reason = decide(current, candidate, change, args.retire, gate)
    record.update(
        audit={"folder": str(args.audit), "counts": counts}, metrics={"current": current, "candidate": candidate}
    )
    if reason:
        return refuse(store, record, reason)
    record["decision"] = "promoted"
    previous, new = store.promote(args.candidate)
    record.update(previous_version=previous, new_version=new)
    print(f"promoted {candidate['model']['version']} to {store.current} (version folder {new}; previous {previous})")
    return finish(args, store, record, candidate_model.manifest.version)


def refuse(store: ModelStore, record: dict[str, Any], reason: str) -> int:
    record["reason"] = reason
    print(f"refused: {reason}")
    print(f"decision record: {store.record(record)}")
    return EXIT_REFUSED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flywheel.promote", description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", type=Path, help="the new model folder (model.onnx + manifest.json)")
    parser.add_argument("--current", type=Path, required=True, help="the folder the service serves (--model-dir)")
    parser.add_argument("--audit", type=Path, help="audit class-folder tree (flywheel.captures export --audit-out)")
    parser.add_argument("--reload-url", help="the running service (base URL or .../admin/reload)")
    parser.add_argument("--min-gain", type=float, default=0.0, help="AUC the candidate must gain")
    parser.add_argument("--routing-tolerance", type=float, default=0.02, help="routing accuracy the candidate may lose")
    parser.add_argument(
        "--class-routing-tolerance",
        type=float,
        default=0.10,
        help="routing the candidate may lose on any one class both models serve (judged on classes with at "
        "least --min-class-photos audit photos)",
    )
    parser.add_argument(
        "--catch-tolerance", type=float, default=0.05, help="trash caught at gamma the candidate may lose"
    )
    parser.add_argument(
        "--reject-tolerance",
        type=float,
        default=0.05,
        help="normal-reject rate at gamma the candidate may add, over the current model's and over its own claim",
    )
    parser.add_argument(
        "--min-class-photos",
        type=int,
        default=MIN_AUDIT_PHOTOS,
        help="audit photos a new class needs to be judged (fewer: exit 2), and an old class to be judged on its own",
    )
    parser.add_argument(
        "--min-new-routing",
        type=float,
        default=0.5,
        help="share of a new class's audit photos the candidate must route to it",
    )
    parser.add_argument(
        "--retire",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=[],
        metavar="CLASS[,CLASS]",
        help="classes the candidate may drop (without it, a candidate that drops a class is refused)",
    )
    parser.add_argument(
        "--min-audit-anomalies",
        type=int,
        default=5,
        help="fewest anomaly photos in the audit tree to judge on (fewer: exit 2, nothing changes)",
    )
    parser.add_argument("--rollback", action="store_true", help="switch back to the previous version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FileNotFoundError as exc:  # e.g. --current in a folder that does not exist
        print(f"error: {exc.filename or exc}: {exc.strerror or 'not found'}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
