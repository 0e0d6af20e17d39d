"""``python -m service check``: does this model run right on this box, and how fast? Run before a bin goes live.

It loads the model exactly as the service does (sha256, the artifact contract, the golden scores recomputed
on this CPU and provider), then scores ``-n`` photos one at a time the way an upload is scored (decode, resize,
one ONNX Runtime call) and prints one ``summary:`` line. In the image: ``docker run IMAGE check``.

Exit 0: verified and timed. Exit 1: a check failed, with the reason (a golden mismatch names the reference
photo and both scores). Exit 2: bad input, one ``error:`` line. Needs only the serve extra (no torch).

Example:
    $ python -m service check --model-dir models/trashnet-lite0 -n 100
    summary: model=trashnet-lite0 version=2.0.0 golden=verified n=100 ms_per_photo_p50=... photos_per_s=...
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from service.imaging import ImageError, image_files, load_image
from service.manifest import MANIFEST_FILE, MODEL_FILE
from service.model import ModelLoadError, limit_heap_retention, load_model
from service.settings import Settings

DEFAULT_PHOTOS = Path(__file__).resolve().parent / "check_photos"  # six TrashNet photos, shipped in the image
DEFAULT_COUNT = 50

# The CPU extensions that choose ONNX Runtime's kernels. x86: AVX2/AVX-512 float kernels, VNNI/AMX for INT8
# (without VNNI the U8S8 kernels can saturate: why golden scores exist). aarch64: asimddp (SDOT) and i8mm
# (SMMLA) are the fast INT8 dot products, absent on a Pi 4's Cortex-A72, present on a Pi 5's Cortex-A76
# (asimddp only); bf16 and sve exist on newer cores.
X86_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
# aarch64 hwcaps as ONNX Runtime's cpuinfo reads them (getauxval; linux/arch/arm64/include/uapi/asm/hwcap.h).
ARM_HWCAP = {"asimd": (16, 1 << 1), "asimdhp": (16, 1 << 10), "asimddp": (16, 1 << 20), "sve": (16, 1 << 22)}
ARM_HWCAP2 = {"i8mm": (26, 1 << 13), "bf16": (26, 1 << 14)}


class CheckFailedError(RuntimeError):
    """The model does not run right here: exit 1 with this reason."""


class BadInputError(ValueError):
    """A flag or folder the check cannot use: one ``error:`` line, exit 2."""


def cpu_features() -> str:
    """The extensions above that this CPU has, joined by ``+``: from the kernel's hwcaps on aarch64 (right under
    qemu-user too, where /proc describes the host), from /proc/cpuinfo elsewhere; ``unknown`` when unreadable."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        try:
            getauxval = ctypes.CDLL(None).getauxval
        except (OSError, AttributeError):
            return "unknown"
        getauxval.restype = ctypes.c_ulong
        getauxval.argtypes = [ctypes.c_ulong]
        found = [name for name, (at, bit) in {**ARM_HWCAP, **ARM_HWCAP2}.items() if getauxval(at) & bit]
    else:
        try:
            flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            return "unknown"
        found = [name for name in X86_FEATURES if name in flags]
    return "+".join(found) or "none"


def read_photos(folder: Path) -> list[tuple[str, bytes]]:
    """Every photo directly in ``folder`` as bytes; BadInputError when the folder is missing, unreadable or empty."""
    if not folder.is_dir():
        raise BadInputError(f"--photos {folder} is not a folder")
    try:
        files = image_files(folder)
        photos = [(path.name, path.read_bytes()) for path in files]
    except OSError as exc:
        raise BadInputError(f"--photos {folder} cannot be read: {exc.strerror or exc}") from None
    if not photos:
        raise BadInputError(f"--photos {folder} holds no photos (.jpg, .png, ...)")
    return photos


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000, q))


def run_check(model_dir: Path, photos_dir: Path, count: int, settings: Settings) -> str:
    """Verify and time the model; returns the summary line. BadInputError / CheckFailedError on failure."""
    if not (model_dir / MODEL_FILE).is_file() or not (model_dir / MANIFEST_FILE).is_file():
        raise BadInputError(f"--model-dir {model_dir} is not a model folder: it needs {MODEL_FILE} and {MANIFEST_FILE}")
    photos = read_photos(photos_dir)
    try:
        model = load_model(model_dir, settings)
    except ModelLoadError as exc:
        raise CheckFailedError(str(exc)) from None
    manifest = model.manifest
    print(f"model: {manifest.name} {manifest.version} ({manifest.method}) from {model.model_dir}: sha256 ok")
    print(f"golden: {model.golden.status}: {model.golden.detail}")
    height, width, channels = model.input_shape
    seconds = []
    started = time.perf_counter()
    for i in range(count):
        name, data = photos[i % len(photos)]
        start = time.perf_counter()
        try:
            image = load_image(data, height, width, channels, settings.max_pixels)
        except ImageError as exc:
            raise BadInputError(f"--photos {photos_dir / name}: {exc.message}") from None
        scores = model.run(image[None])
        seconds.append(time.perf_counter() - start)
        if not np.all(np.isfinite(scores.score)):
            raise CheckFailedError(f"{name} scored {scores.score[0]}: not a finite score")
    wall = time.perf_counter() - started
    print(f"photos: {count} scored one at a time (decode + resize + the engine), {len(photos)} from {photos_dir}")
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return (
        f"summary: model={model.model_dir.name} version={manifest.version} golden={model.golden.status} n={count} "
        f"ms_per_photo_p50={percentile_ms(seconds, 50):.2f} ms_per_photo_p95={percentile_ms(seconds, 95):.2f} "
        f"photos_per_s={count / wall:.1f} peak_rss_mb={peak_rss_mb:.0f} "
        f"engine={model.engine}/{model.providers[0]} cpu={platform.machine()} "
        f"cpu_features={cpu_features()}"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service check", description=__doc__.split("\n\n")[0], epilog="Exit 0 ok, 1 failed, 2 bad input."
    )
    parser.add_argument(
        "--model-dir", type=Path, help="model folder (default: DEEPMAD_MODEL_DIR, else the shipped one)"
    )
    parser.add_argument(
        "--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of photos to time (default: six shipped)"
    )
    parser.add_argument(
        "-n", type=int, default=DEFAULT_COUNT, help=f"photos to time at batch 1 (default {DEFAULT_COUNT})"
    )
    args = parser.parse_args(argv)
    limit_heap_retention()  # the serving process's memory settings, so peak_rss_mb speaks for it
    try:
        if args.n < 1:
            raise BadInputError(f"-n must be at least 1, got {args.n}")
        try:  # DEEPMAD_* settings (threads, providers) as the service would use them
            settings = Settings() if args.model_dir is None else Settings(model_dir=args.model_dir)
        except ValidationError as exc:
            raise BadInputError(f"a DEEPMAD_* setting is invalid: {exc.errors()[0]['msg']}") from None
        print(run_check(settings.model_dir, args.photos, args.n, settings))
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CheckFailedError as exc:
        print(f"check failed: {exc}", file=sys.stderr)
        return 1
    return 0
