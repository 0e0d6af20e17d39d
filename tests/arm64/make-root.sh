#!/usr/bin/env bash
# An arm64 Debian root with the serve extra installed, run under qemu-user: tests/test_arm64.py serves
# every shipped model in it on emulated Raspberry Pi cores. Called by `make test` (target arm64-root).
#
# Idempotent and cached where the machine keeps it (~/.cache/deepmad-bin/arm64-root, or
# DEEPMAD_ARM64_ROOT): debootstrap runs once (about 3 minutes), the serve extra is reinstalled only when
# pyproject.toml's serve requirements change (about 20 s). Where arm64 cannot run here (no binfmt_misc,
# no qemu, no network for debootstrap) it writes one line saying why to $ROOT.unavailable and exits 0:
# the test then skips with that line. Speed under emulation means nothing; only answers are checked.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROOT="${DEEPMAD_ARM64_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/deepmad-bin/arm64-root}"
REASON_FILE="$ROOT.unavailable"
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

rm -f "$REASON_FILE"
unavailable() {
    mkdir -p "$(dirname "$REASON_FILE")"
    echo "$*" >"$REASON_FILE"
    echo "arm64: not available here: $*"
    exit 0
}
started=$SECONDS

# qemu-user and binfmt from Debian; the kernel's binfmt_misc mounted where it is absent.
if ! command -v qemu-aarch64-static >/dev/null || ! command -v update-binfmts >/dev/null \
    || ! command -v debootstrap >/dev/null; then
    command -v apt-get >/dev/null || unavailable "no apt-get to install qemu-user-static, binfmt-support, debootstrap"
    $SUDO apt-get update -q >/dev/null \
        && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
            qemu-user-static binfmt-support debootstrap >/dev/null \
        || unavailable "apt-get could not install qemu-user-static, binfmt-support and debootstrap"
fi
BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e "$BINFMT/register" ]; then
    $SUDO mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null \
        || unavailable "binfmt_misc is not mounted and cannot be mounted (an unprivileged container?)"
fi
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
    $SUDO update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 \
        || unavailable "update-binfmts could not register qemu-aarch64 with binfmt_misc"
fi
[ "$(head -n 1 "$BINFMT/qemu-aarch64")" = enabled ] || unavailable "qemu-aarch64 is registered but disabled in binfmt_misc"

# The root: debootstrap into a temporary folder, renamed into place only once complete.
if [ ! -e "$ROOT/.debootstrap-done" ]; then
    command -v chroot >/dev/null || unavailable "no chroot command"
    building="$ROOT.building"
    $SUDO rm -rf "$building"
    mkdir -p "$building"
    echo "arm64: debootstrap $SUITE into $ROOT (about 3 minutes, once)"
    if ! $SUDO debootstrap --arch arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$building" "$MIRROR" >"$building.log" 2>&1; then
        tail -n 5 "$building.log" >&2
        unavailable "debootstrap --arch arm64 failed (see $building.log)"
    fi
    $SUDO touch "$building/.debootstrap-done"
    $SUDO rm -rf "$ROOT"
    $SUDO mv "$building" "$ROOT"
    rm -f "$building.log"
fi
# pip and the index from inside the root: this host's resolver and CA bundle (a proxy's CA included).
$SUDO cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
[ -f /etc/ssl/certs/ca-certificates.crt ] && $SUDO cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"

# The serve extra (and the base dependencies) as aarch64 wheels from the package index, in /opt/venv.
requirements="$(python3 - "$REPO_ROOT/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["serve"]))
PY
)" || unavailable "python3 could not read the serve extra from pyproject.toml (tomllib needs Python 3.11+)"
key="$(printf '%s\n' "$requirements" | sha256sum | cut -c1-16)"
if [ ! -e "$ROOT/opt/venv/.serve-$key" ]; then
    echo "arm64: installing the serve extra into $ROOT/opt/venv"
    $SUDO rm -rf "$ROOT/opt/venv"
    printf '%s\n' "$requirements" | $SUDO tee "$ROOT/opt/requirements.txt" >/dev/null
    if ! $SUDO chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root \
        PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
        /bin/sh -c 'python3 -m venv /opt/venv && /opt/venv/bin/pip install -q --no-cache-dir -r /opt/requirements.txt'; then
        unavailable "pip could not install the serve extra inside the arm64 root"
    fi
    $SUDO touch "$ROOT/opt/venv/.serve-$key"
fi
echo "arm64: root ready at $ROOT ($((SECONDS - started)) s): $($SUDO chroot "$ROOT" /opt/venv/bin/python -c \
    'import platform, onnxruntime; print(platform.machine(), "onnxruntime", onnxruntime.__version__)' 2>/dev/null)"
