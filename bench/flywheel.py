"""The flywheel, measured: a bin that captures, an operator who labels, retraining, the gate, a reload.

    .venv/bin/python -m bench.flywheel --out runs/flywheel          # default size: < 30 min on 2 cores
    .venv/bin/python -m bench.flywheel --retrain-only --new-photos 50 --recipe "<pretrained flags>"

``--retrain-only`` times one retrain instead of the loop (``retrain_only`` below says how).

What one run does, for each labelling order (``uncertain``: the captures closest to gamma first, the
order of ``GET /captures?order=uncertain``; ``random``: a seeded draw among unlabelled captures):

1. Round 0: the bin starts where a new site starts, with no trash labelled: the bench's recipe trained
   on TrashNet's training split of the five recyclables only (``training.fit --dataset trashnet``, no
   outlier exposure). Both orders start from this same model.
2. The bin is the real service (``python -m service``, uvicorn on 127.0.0.1) with capture on
   (``DEEPMAD_CAPTURE_DIR``; the default policy: every anomalous item, the uncertain band around gamma,
   a sample of confident normals) and operator and admin tokens.
3. Each round the bin classifies ``--per-round`` TrashNet photos from outside the fixed test split
   (a seeded stream; ``--trash-share`` of them trash), each with its own ``X-Request-ID``. The
   operator then labels ``--labels-per-round`` unlabelled captures with their true TrashNet class
   through ``POST /feedback``.
4. ``flywheel.captures export`` merges the labelled captures into the training tree (seeded with the
   same recyclable training photos, named by sha256 so a streamed photo is never added twice) and the
   audit share into the audit tree (seeded with TrashNet's validation recyclables, which no model
   trains on). ``training.fit --dataset folder`` retrains the recipe with outlier exposure from the
   exported trash (``--exposure-from-train``: the trash in the tree's training split).
5. ``flywheel.promote`` scores candidate and serving model on the audit tree and swaps and reloads the
   candidate only when it is not worse; ``GET /model`` then shows what the bin serves.

After every round the serving model and the candidate are scored (ONNX Runtime, the service's image
function) on the fixed test split: TrashNet's recyclable test photos and the 59 test trash photos of
the shipped model's manifest, which the stream never shows. AUC and TPR at gamma are printed against
the number of labelled items, and written to ``<out>/flywheel.json`` and ``<out>/flywheel.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench.figures import save_png
from bench.processes import service_command, service_env, started
from flywheel.captures import SHA_PREFIX, iter_captures
from flywheel.metrics import roc_auc
from service.imaging import load_image_file
from service.model import load_model
from service.settings import Settings
from training.data.base import ANOMALY_SPLIT_SEED, SPLIT_SEED, split_per_class
from training.data.folders import (
    FOLDER_SPLIT,
    TRASHNET_ANOMALY,
    TRASHNET_NORMAL,
    class_folders,
    folder_files,
    image_files,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
OPERATOR_TOKEN = "flywheel-operator"
ADMIN_TOKEN = "flywheel-admin"
ORDERS = ("uncertain", "random")


def data_root() -> Path:
    configured = os.environ.get("DEEPMAD_DATA_ROOT")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"


@dataclass
class Splits:
    """TrashNet photo files split exactly as ``training.fit --dataset trashnet --anomaly-holdout 0.5`` does."""

    train: list[tuple[Path, str]] = field(default_factory=list)  # recyclables the models train on
    val: list[tuple[Path, str]] = field(default_factory=list)  # recyclables no model trains on (audit seed)
    test: list[tuple[Path, str]] = field(default_factory=list)  # the fixed test split, never streamed
    held_trash: list[Path] = field(default_factory=list)  # trash outside the test split: the stream's trash


def trashnet_splits(root: Path) -> Splits:
    """The files behind ``load_trashnet`` + ``make_task(anomaly_holdout=0.5)``: same seeds, same order."""
    names = class_folders(root)
    files, labels = folder_files(root, names)
    label_array = np.asarray(labels)
    train, val, test = split_per_class(label_array, FOLDER_SPLIT, SPLIT_SEED)
    trash = np.flatnonzero(label_array == names.index(TRASHNET_ANOMALY))
    train, val, test = np.setdiff1d(train, trash), np.setdiff1d(val, trash), np.union1d(test, trash)
    # make_task: the anomaly holdout is drawn from the test split's anomalies, in test-split order.
    test_anomalous = np.flatnonzero(label_array[test] == names.index(TRASHNET_ANOMALY))
    picked, _ = split_per_class(label_array[test][test_anomalous], (0.5, 0.5), ANOMALY_SPLIT_SEED)
    held = test[test_anomalous[picked]]
    test = np.setdiff1d(test, held)

    def named(index: np.ndarray) -> list[tuple[Path, str]]:
        return [(files[i], names[labels[i]]) for i in index]

    return Splits(named(train), named(val), named(test), [files[i] for i in held])


def add_to_tree(tree: Path, photos: list[tuple[Path, str]]) -> None:
    """Seed a class-folder tree with photos named as ``flywheel.captures export`` names them."""
    for photo, label in photos:
        data = photo.read_bytes()
        target = tree / label / f"{hashlib.sha256(data).hexdigest()[:SHA_PREFIX]}{photo.suffix.lower()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


class TestSplit:
    """The fixed test split, decoded once per input shape, and the product metrics of a model on it."""

    __test__ = False

    def __init__(self, photos: list[tuple[Path, str]]):
        self.files = [path for path, _ in photos]
        self.anomalous = np.array([label == TRASHNET_ANOMALY for _, label in photos])
        self._arrays: dict[tuple[int, int, int], np.ndarray] = {}

    def evaluate(self, model_dir: Path) -> dict[str, Any]:
        model = load_model(model_dir, Settings(threshold=None, providers=["CPUExecutionProvider"]))
        shape = model.input_shape
        if shape not in self._arrays:
            self._arrays[shape] = np.stack([load_image_file(path, *shape) for path in self.files])
        scores = np.concatenate(
            [model.run(self._arrays[shape][i : i + 256]).score for i in range(0, len(self.files), 256)]
        ).astype(np.float64)
        flagged = scores >= model.threshold
        return {
            "version": model.manifest.version,
            "auc": roc_auc(scores, self.anomalous),
            "tpr_at_gamma": float(flagged[self.anomalous].mean()),
            "fpr_at_gamma": float(flagged[~self.anomalous].mean()),
            "score_std": float(scores.std()),
        }


def run_module(module: str, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", module, *map(str, args)]
    print("  $ python -m " + module + " " + " ".join(map(str, args)), file=sys.stderr)
    return subprocess.run(
        command, cwd=REPO_ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=False
    )


def fit(out: Path, args: argparse.Namespace, *data_args: object) -> None:
    result = run_module(
        "training.fit", *data_args, "--augment", "--ae-epochs", args.ae_epochs, "--epochs", args.epochs,
        "--max-train-per-class", args.max_train_per_class, "--seed", args.seed, "--threads", args.threads,
        "--quiet", "--out", out, "--checkpoint", out.with_suffix(".pt"), "--version", out.name,
        *shlex.split(args.recipe),
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"training.fit failed for {out}:\n{result.stderr[-2000:]}")


def folder_exposure(n_trash: int) -> tuple[float, int] | None:
    """``--anomaly-holdout`` and ``--exposure-from-train`` for a class-folder tree holding ``n_trash`` trash.

    ``--dataset folder`` splits the trash folder like every class (70/10/20, training.data.folders);
    the training share is the exposure pool, and the holdout must leave at least one selection and
    one test photo of the test share. None when the tree has too few trash photos for that (< 12).
    """
    train = int(round(FOLDER_SPLIT[0] * n_trash))
    test = n_trash - train - int(round(FOLDER_SPLIT[1] * n_trash))
    if test < 3 or train < 1:
        return None
    picked = min(test - 1, max(2, test // 2))  # selection = picked // 2 >= 1, test keeps >= 1
    return (picked + 0.25) / test, train


@contextlib.contextmanager
def bin_service(model_dir: Path, captures: Path, log_path: Path, normal_rate: float | None) -> Iterator[str]:
    """The real service on 127.0.0.1 with capture on; yields its base URL."""
    env = service_env(
        DEEPMAD_CAPTURE_DIR=str(captures), DEEPMAD_OPERATOR_TOKEN=OPERATOR_TOKEN, DEEPMAD_ADMIN_TOKEN=ADMIN_TOKEN
    )
    if normal_rate is not None:
        env["DEEPMAD_CAPTURE_NORMAL_RATE"] = str(normal_rate)
    command = service_command(model_dir)
    with started(
        command, "/readyz", env=env, name="the service", timeout_s=120, log_path=log_path, stop_timeout_s=20
    ) as running:
        yield running.url


def make_stream(splits: Splits, total: int, trash_share: float, seed: int) -> list[tuple[Path, str]]:
    """``total`` photos from outside the test split, ``trash_share`` of them trash, in a seeded order."""
    rng = np.random.default_rng(seed)
    n_trash = min(len(splits.held_trash), int(round(trash_share * total)))
    recyclables = splits.train + splits.val
    trash = [
        (splits.held_trash[i], TRASHNET_ANOMALY) for i in rng.choice(len(splits.held_trash), n_trash, replace=False)
    ]
    normal = [recyclables[i] for i in rng.choice(len(recyclables), total - n_trash, replace=False)]
    stream = trash + normal
    return [stream[i] for i in rng.permutation(len(stream))]


def wait_for_captures(captures: Path, settle_s: float = 1.5, limit_s: float = 60) -> list:
    """The capture writer works off the request path: wait until the store stops growing."""
    deadline, last, since = time.monotonic() + limit_s, -1, time.monotonic()
    while True:
        found = list(iter_captures(captures)) if captures.is_dir() else []
        if len(found) != last:
            last, since = len(found), time.monotonic()
        elif time.monotonic() - since >= settle_s or time.monotonic() > deadline:
            return found


def label_round(
    client: httpx.Client, captures: Path, truth: dict[str, str], order: str, k: int, rng: np.random.Generator
) -> list[str]:
    """The operator labels ``k`` unlabelled captures with their true class via POST /feedback."""
    unlabelled = [c for c in wait_for_captures(captures) if c.label is None and c.id in truth]
    if order == "uncertain":
        chosen = sorted(unlabelled, key=lambda c: (c.margin, c.id))[:k]
    else:
        chosen = [unlabelled[i] for i in sorted(rng.choice(len(unlabelled), min(k, len(unlabelled)), replace=False))]
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    for capture in chosen:
        answer = client.post("/feedback", json={"id": capture.id, "label": truth[capture.id]}, headers=headers)
        if answer.status_code != 200:
            raise RuntimeError(f"POST /feedback for {capture.id}: {answer.status_code} {answer.text[:300]}")
    return [truth[c.id] for c in chosen]


def run_order(order: str, args: argparse.Namespace, splits: Splits, round0: Path, test: TestSplit) -> list[dict]:
    """One bin through ``args.rounds`` rounds with one labelling order; a record per round."""
    work = args.out / order
    shutil.rmtree(work, ignore_errors=True)
    models, captures, tree, audit = work / "models", work / "captures", work / "data", work / "audit"
    shutil.copytree(round0, models / "bin")
    current = models / "bin"
    seed = splits.train
    if args.seed_per_class is not None:
        seed = [p for name in TRASHNET_NORMAL for p in [q for q in splits.train if q[1] == name][: args.seed_per_class]]
    add_to_tree(tree, seed)
    add_to_tree(audit, splits.val)
    stream = make_stream(splits, args.rounds * args.per_round, args.trash_share, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    truth: dict[str, str] = {}
    labelled: list[str] = []
    serving = test.evaluate(current)
    records = [{"round": 0, "labelled": 0, "labelled_trash": 0, "serving": serving, "candidate": None}]
    print_round(order, records[-1])
    service = bin_service(current, captures, work / "service.log", args.capture_normal_rate)
    with service as url, httpx.Client(base_url=url, timeout=60) as client:
        for round_number in range(1, args.rounds + 1):
            start = (round_number - 1) * args.per_round
            for n, (photo, label) in enumerate(stream[start : start + args.per_round]):
                request_id = f"{order}-r{round_number}-{n:05d}"
                answer = client.post(
                    "/classify",
                    content=photo.read_bytes(),
                    headers={"Content-Type": "image/jpeg", "X-Request-ID": request_id},
                )
                answer.raise_for_status()
                truth[answer.json().get("id") or answer.headers.get("x-request-id") or request_id] = label
            labelled += label_round(client, captures, truth, order, args.labels_per_round, rng)
            record: dict[str, Any] = {
                "round": round_number,
                "labelled": len(labelled),
                "labelled_trash": labelled.count(TRASHNET_ANOMALY),
                "captures": len(wait_for_captures(captures)),
            }
            exported = run_module(
                "flywheel.captures", "export", "--captures", captures, "--out", tree, "--audit-out", audit,
                "--model", current,
            )  # fmt: skip
            if exported.returncode != 0:
                raise RuntimeError(f"export failed: {exported.stderr}")
            record["export"] = json.loads(exported.stdout)
            n_trash = len(image_files(tree / TRASHNET_ANOMALY)) if (tree / TRASHNET_ANOMALY).is_dir() else 0
            record["candidate"] = None
            record["trash_in_tree"] = n_trash
            split = folder_exposure(n_trash)
            if split is None:
                record["gate"] = {"decision": "no retraining", "reason": f"{n_trash} trash photos in the tree"}
            else:
                candidate = work / f"candidate-r{round_number}"
                holdout, exposure = split
                retrain_started = time.monotonic()
                fit(
                    candidate, args, "--dataset", "folder", "--data", tree, "--normal", ",".join(TRASHNET_NORMAL),
                    "--anomaly-holdout", f"{holdout:.4f}", "--outlier-exposure", "--exposure-from-train", exposure,
                )  # fmt: skip
                record["retrain_seconds"] = round(time.monotonic() - retrain_started, 1)
                record["candidate"] = test.evaluate(candidate)
                gate = run_module(
                    "flywheel.promote", "--candidate", candidate, "--current", current, "--audit", audit,
                    "--reload-url", url, "--min-gain", args.min_gain, env={"DEEPMAD_ADMIN_TOKEN": ADMIN_TOKEN},
                )  # fmt: skip
                decision = {0: "promoted", 3: "refused", 2: "not judged"}.get(gate.returncode, "failed")
                lines = (gate.stdout + gate.stderr).strip().splitlines()
                record["gate"] = {"decision": decision, "exit": gate.returncode, "reason": lines[-2:] if lines else []}
                if decision == "failed":
                    raise RuntimeError(f"flywheel.promote failed: {gate.stdout}\n{gate.stderr}")
            served = client.get("/model").json()["version"]
            record["serving"] = test.evaluate(current)
            if served != record["serving"]["version"]:
                raise RuntimeError(f"the service answers as {served}, its model folder holds {record['serving']}")
            records.append(record)
            print_round(order, record)
    return records


def print_round(order: str, record: dict) -> None:
    serving, candidate = record["serving"], record.get("candidate")
    line = (
        f"{order:9} round {record['round']}: labelled {record['labelled']:3d} ({record['labelled_trash']:2d} trash)"
        f"  serving {serving['version']:>14} AUC {serving['auc']:.3f} TPR@gamma {serving['tpr_at_gamma']:.3f}"
    )
    if candidate:
        line += f"  | candidate AUC {candidate['auc']:.3f} TPR@gamma {candidate['tpr_at_gamma']:.3f}"
        line += f" (retrained in {record['retrain_seconds']:.0f} s)"
    if "gate" in record:
        line += f"  gate: {record['gate']['decision']}"
    print(line, flush=True)


def markdown(results: dict[str, list[dict]]) -> str:
    lines = [
        "| order | round | labelled (trash) | serving AUC | serving TPR / FPR at γ | candidate AUC "
        "| candidate TPR at γ | gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for order, records in results.items():
        for r in records:
            s, c = r["serving"], r.get("candidate")
            cand = f"{c['auc']:.3f} | {c['tpr_at_gamma']:.2f}" if c else "– | –"
            gate = r.get("gate", {}).get("decision", "start")
            lines.append(
                f"| {order} | {r['round']} | {r['labelled']} ({r['labelled_trash']}) | {s['auc']:.3f} | "
                f"{s['tpr_at_gamma']:.2f} / {s['fpr_at_gamma']:.3f} | {cand} | {gate} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for order, records in results.items():
        x = [r["labelled"] for r in records]
        for axis, key in zip(axes, ("auc", "tpr_at_gamma"), strict=True):
            axis.plot(x, [r["serving"][key] for r in records], marker="o", label=f"{order}: serving")
            points = [(r["labelled"], r["candidate"][key]) for r in records if r.get("candidate")]
            if points:
                axis.plot(*zip(*points, strict=True), linestyle="--", marker="x", label=f"{order}: candidate")
    for axis, title in zip(axes, ("test AUC (recyclables vs trash)", "test TPR at γ"), strict=True):
        axis.set_xlabel("labelled items")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    save_png(figure, path, dpi=110)


# ---- --retrain-only: one flywheel retrain on a warm cache, stage by stage ----

NEW_PHOTO_CROP = 0.85  # a new photo is a seeded crop of at least this share of each side: pixels no cache has seen


def new_photo(photo: Path, rng: np.random.Generator) -> bytes:
    """``photo`` as the bin might see the item again: a random crop, a fresh JPEG (new pixels, new hashes)."""
    with Image.open(photo) as image:
        image = image.convert("RGB")
        width, height = image.size
        w, h = (int(side * rng.uniform(NEW_PHOTO_CROP, 1.0)) for side in (width, height))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        buffer = io.BytesIO()
        image.crop((left, top, left + w, top + h)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_labelled_captures(captures: Path, photos: list[tuple[bytes, str]], model_dir: Path, tag: str) -> None:
    """Labelled captures in the capture format (docs/capture-format.md), as the service and /feedback leave
    them; the export reads only the image and its label, so score and distances are placeholders."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    now = dt.datetime.now(dt.timezone.utc)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    day = captures / now.strftime("%Y-%m-%d")
    day.mkdir(parents=True, exist_ok=True)
    model = {"name": manifest["name"], "version": manifest["version"], "sha256": manifest["model_sha256"]}
    for n, (data, label) in enumerate(photos):
        capture_id = f"{tag}-{n:04d}"
        sidecar = {
            "id": capture_id, "time": stamp, "image": f"{capture_id}.jpg",
            "image_sha256": hashlib.sha256(data).hexdigest(), "image_bytes": len(data), "content_type": "image/jpeg",
            "model": model, "score": 0.0, "threshold": 0.0, "verdict": "normal",
            "nearest_class": manifest["class_names"][0], "distances": dict.fromkeys(manifest["class_names"], 0.0),
            "reason": "sampled", "label": label, "labelled_at": stamp, "label_source": "feedback",
        }  # fmt: skip
        (day / sidecar["image"]).write_bytes(data)
        (day / f"{capture_id}.json").write_text(json.dumps(sidecar, indent=2) + "\n")


def timed_module(module: str, *args: object, ok: tuple[int, ...] = (0,)) -> tuple[float, float, str]:
    """Run ``python -m module args``; (wall seconds, CPU seconds, stdout). The CPU seconds (user + system of
    the child) say what the stage costs when a busy machine stretches its wall time. A return code outside
    ``ok`` stops the bench."""
    started_at, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_module(module, *args)
    seconds, after = time.monotonic() - started_at, resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode not in ok:
        raise RuntimeError(f"{module} exited {result.returncode}:\n{result.stderr[-2000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, cpu, result.stdout


def retrain_round(args: argparse.Namespace, work: Path, current: Path, name: str) -> dict[str, Any]:
    """export -> training.fit (the recipe, outlier exposure from the tree's trash) -> the gate, each timed."""
    tree, audit, candidate = work / "data", work / "audit", work / f"candidate-{name}"
    export_s, export_cpu, exported = timed_module(
        "flywheel.captures", "export", "--captures", work / "captures", "--out", tree, "--audit-out", audit,
        "--model", current,
    )  # fmt: skip
    holdout, exposure = folder_exposure(len(image_files(tree / TRASHNET_ANOMALY)))
    fit_s, fit_cpu, fitted = timed_module(
        "training.fit", "--dataset", "folder", "--data", tree, "--normal", ",".join(TRASHNET_NORMAL),
        "--anomaly-holdout", f"{holdout:.4f}", "--outlier-exposure", "--exposure-from-train", exposure, "--augment",
        "--seed", args.seed, "--threads", args.threads, "--quiet", "--out", candidate,
        "--checkpoint", candidate.with_suffix(".pt"), "--version", name, *shlex.split(args.recipe),
    )  # fmt: skip
    gate_s, gate_cpu, gate = timed_module(
        "flywheel.promote", "--candidate", candidate, "--current", current, "--audit", audit, ok=(0, 3)
    )
    lines = gate.strip().splitlines()
    return {
        "export_s": round(export_s, 1),
        "fit_s": round(fit_s, 1),
        "gate_s": round(gate_s, 1),
        "retrain_s": round(export_s + fit_s + gate_s, 1),
        "cpu_s": round(export_cpu + fit_cpu + gate_cpu, 1),
        "stage_cpu_s": {"export": round(export_cpu, 1), "fit": round(fit_cpu, 1), "gate": round(gate_cpu, 1)},
        "export": json.loads(exported),
        "fit_stages_s": json.loads(fitted).get("seconds"),
        "tree_photos": sum(len(image_files(folder)) for folder in tree.iterdir()),
        "audit_photos": sum(len(image_files(folder)) for folder in audit.iterdir()),
        "gate": lines[-1] if lines else "",
    }


def retrain_only(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The flywheel's retrain with ``--new-photos`` new labelled photos on top of a warm cache, stage by stage.

    The tree is TrashNet's recyclable training split and 60% of the held trash (outlier exposure); the audit
    tree its validation recyclables and 20% of the held trash; the serving model ``--current`` (a copy).
    Round ``warm`` exports nothing new and retrains on the tree as it is: it fills DEEPMAD_CACHE_DIR where
    this tree was never seen, and is a no-change retrain where it was. Round ``new`` writes the new photos as
    labelled captures (random crops, new every run, of photos held out of the tree, ``--trash-share`` of them
    trash, saved as fresh JPEGs, so no cache has their pixels; the export's audit share, a fifth, goes to the
    audit tree by capture id) and times export, training.fit (features, heads, measurement, ONNX export) and
    the gate. ``--threads`` is training.fit's: on a busy machine one thread is faster (docs/flywheel.md).
    """
    splits = trashnet_splits(root)
    work = args.out / "retrain"
    shutil.rmtree(work, ignore_errors=True)
    rng = np.random.default_rng(args.seed)
    trash = [splits.held_trash[i] for i in rng.permutation(len(splits.held_trash))]
    recyclables = [splits.train[i] for i in rng.permutation(len(splits.train))]
    n_new_trash = int(round(args.trash_share * args.new_photos))
    tree_trash, audit_trash = int(0.6 * len(trash)), int(0.8 * len(trash))
    if n_new_trash > len(trash) - audit_trash or args.new_photos - n_new_trash > len(recyclables) // 2:
        raise ValueError(f"--new-photos {args.new_photos} with --trash-share {args.trash_share} is more than held out")
    held_out = recyclables[: args.new_photos - n_new_trash]
    add_to_tree(work / "data", recyclables[len(held_out) :])
    add_to_tree(work / "data", [(p, TRASHNET_ANOMALY) for p in trash[:tree_trash]])
    add_to_tree(work / "audit", splits.val + [(p, TRASHNET_ANOMALY) for p in trash[tree_trash:audit_trash]])
    current = work / "models" / "bin"
    shutil.copytree(args.current, current)
    (work / "captures").mkdir()
    load_before = os.getloadavg()
    warm = retrain_round(args, work, current, "warm")
    print(f"warm round (no new photos): {warm['retrain_s']} s {stage_line(warm)}", flush=True)
    nonce = np.random.default_rng()  # fresh pixels every run: the new photos are never in the cache
    new = [(new_photo(p, nonce), label) for p, label in held_out]
    new += [(new_photo(p, nonce), TRASHNET_ANOMALY) for p in trash[audit_trash : audit_trash + n_new_trash]]
    write_labelled_captures(work / "captures", new, current, "new")  # the same ids, so the same audit share
    timed = retrain_round(args, work, current, "new")
    load_after = os.getloadavg()
    return {"warm": warm, "new": timed, "load_before": load_before, "load_after": load_after}


def stage_line(record: dict[str, Any]) -> str:
    stages = " ".join(f"{k}={record[k]}" for k in ("export_s", "fit_s", "gate_s"))
    inside = record.get("fit_stages_s") or {}
    cpu = " ".join(f"{k}={v}" for k, v in record["stage_cpu_s"].items())
    return stages + "".join(f" fit.{k}={v}" for k, v in inside.items()) + f" cpu_s={record['cpu_s']} ({cpu})"


def print_retrain(args: argparse.Namespace, result: dict[str, Any]) -> None:
    new = result["new"]
    load = "/".join(f"{x:.2f}" for x in result["load_after"])
    print(
        f"summary: retrain_s={new['retrain_s']} {stage_line(new)} new_photos={args.new_photos} threads={args.threads} "
        f"written={new['export']['written']} audit_written={new['export']['audit_written']} "
        f"tree_photos={new['tree_photos']} audit_photos={new['audit_photos']} "
        f"warm_round_s={result['warm']['retrain_s']} "
        f"load_avg={load} (before: {'/'.join(f'{x:.2f}' for x in result['load_before'])})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.flywheel", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "flywheel")
    parser.add_argument("--data", type=Path, help="TrashNet folder (default: DEEPMAD_DATA_ROOT/trashnet)")
    parser.add_argument("--orders", default=",".join(ORDERS), help="labelling orders: uncertain, random")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=200, help="photos the bin classifies per round")
    parser.add_argument("--trash-share", type=float, default=0.1, help="share of trash in the stream")
    parser.add_argument("--labels-per-round", type=int, default=30, help="k: captures labelled per round")
    parser.add_argument(
        "--capture-normal-rate", type=float, help="the bin's share of confident normals kept (default: the service's)"
    )
    parser.add_argument(
        "--seed-per-class", type=int, help="recyclable training photos per class in the training tree (default: all)"
    )
    parser.add_argument(
        "--recipe",
        default="",
        help="more training.fit flags for every training, e.g. the pretrained model's: "
        "'--backbone efficientnet-lite0 --input-size 128 --rep-dim 32 --lr 1e-3 --delta 2 --weight-decay 1e-2'",
    )
    parser.add_argument("--ae-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--max-train-per-class", type=int, default=100)
    parser.add_argument("--min-gain", type=float, default=0.0, help="the gate's --min-gain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--round0", type=Path, help="start both bins from this model folder instead of training round 0"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training")
    parser.add_argument(
        "--retrain-only",
        action="store_true",
        help="time one retrain of --recipe with --new-photos new labelled photos on a warm cache (no service)",
    )
    parser.add_argument("--new-photos", type=int, default=50, help="--retrain-only: new labelled photos")
    parser.add_argument(
        "--current",
        type=Path,
        default=REPO_ROOT / "models" / "trashnet-lite0",
        help="--retrain-only: the serving model the gate compares against (copied)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    if not orders or any(o not in ORDERS for o in orders):
        print(f"error: --orders takes {', '.join(ORDERS)}", file=sys.stderr)
        return 2
    root = args.data or data_root() / "trashnet"
    if not root.is_dir():
        print(f"error: TrashNet not found at {root}; pass --data or set DEEPMAD_DATA_ROOT", file=sys.stderr)
        return 2
    if args.retrain_only:
        if args.new_photos < 1 or not (args.current / "manifest.json").is_file():
            print("error: --retrain-only needs --new-photos >= 1 and a model folder as --current", file=sys.stderr)
            return 2
        try:
            result = retrain_only(args, root)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "retrain.json").write_text(json.dumps(result, indent=2) + "\n")
        print_retrain(args, result)
        return 0
    started = time.monotonic()
    splits = trashnet_splits(root)
    test = TestSplit(splits.test)
    args.out.mkdir(parents=True, exist_ok=True)
    round0 = args.round0 or args.out / "round0"
    if args.round0 is None:
        shutil.rmtree(round0, ignore_errors=True)
        fit(round0, args, "--dataset", "trashnet", "--data", root)
    results = {order: run_order(order, args, splits, round0, test) for order in orders}
    summary = {
        "command": "python -m bench.flywheel " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "test_split": {"normal": int((~test.anomalous).sum()), "trash": int(test.anomalous.sum())},
        "seconds": round(time.monotonic() - started, 1),
        "results": results,
    }
    (args.out / "flywheel.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(results, args.out / "flywheel.png")
    print(markdown(results))
    print(f"{summary['seconds']:.0f} s; {args.out / 'flywheel.json'}, {args.out / 'flywheel.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
