#!/usr/bin/env bash
# Container smoke test: build the CPU serving image, run it the way docker-compose.yml does (read-only
# root, tmpfs /tmp, non-root), wait for /readyz, classify real TrashNet photos, check the JSON verdict,
# reload the model over HTTP and with SIGHUP, run the image's HEALTHCHECK, then stop and remove the
# container. Exit status 0 only if every check passed.
#
#   docker/smoke-test.sh            (or: make smoke)
#
# Works with Docker or Podman (CONTAINER_ENGINE=docker|podman to choose; default: a working docker,
# else podman). On a Debian host with neither, it installs podman + runc with apt-get. When the base
# image (BASE_IMAGE, default python:3.11-slim) cannot be pulled, as on an offline build machine, it
# builds a stand-in: a Debian bookworm root with python3 made by debootstrap, imported as an image.
#
# Environment:
#   CONTAINER_ENGINE  docker | podman (default: auto)
#   BASE_IMAGE        base of both build stages (default python:3.11-slim, stand-in if unpullable)
#   SMOKE_IMAGE       tag to build (default deepmad-bin:smoke)
#   SMOKE_PORT        host port to publish (default 18080)
#   DEEPMAD_DATA_ROOT folder holding trashnet/ (default ../shared/data beside the checkout)
#   KEEP_IMAGE=1      keep the built image (default: kept; set KEEP_IMAGE=0 to remove it)
#   SMOKE_ARM64=0     skip the linux/arm64 image (default on x86_64: built and run under qemu-user, about
#                     10 minutes; where binfmt_misc or qemu cannot be had it is skipped with one line)
#   QEMU_CPU          the emulated arm64 core (default cortex-a72, a Raspberry Pi 4; cortex-a76 is a Pi 5)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

DEFAULT_BASE="python:3.11-slim"
STANDIN_IMAGE="localhost/deepmad-python-standin:3.11-bookworm"
IMAGE="${SMOKE_IMAGE:-deepmad-bin:smoke}"
PORT="${SMOKE_PORT:-18080}"
DATA_ROOT="${DEEPMAD_DATA_ROOT:-$REPO_ROOT/../shared/data}"
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
KEEP_IMAGE="${KEEP_IMAGE:-1}"
CONTAINER="deepmad-smoke-$$"
ADMIN_TOKEN="smoke-$$-$RANDOM"

STEP=0
step() { STEP=$((STEP + 1)); printf '\n==> [%d] %s\n' "$STEP" "$*"; }
info() { printf '    %s\n' "$*"; }
fail() { printf '\nSMOKE TEST FAILED: %s\n' "$*" >&2; exit 1; }
trap 'printf "\nSMOKE TEST FAILED at line %s: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

apt_install() {
    command -v apt-get >/dev/null || fail "missing $*, and no apt-get to install it: install $* yourself"
    info "installing from Debian: $*"
    $SUDO apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

# ---------------------------------------------------------------------------------------------------
step "Container engine"
ENGINE="${CONTAINER_ENGINE:-}"
if [ -z "$ENGINE" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        ENGINE=docker
    else
        ENGINE=podman
    fi
fi
case "$ENGINE" in
    docker) ;;
    podman)
        missing=()
        command -v podman >/dev/null || missing+=(podman)
        command -v runc >/dev/null || missing+=(runc)
        if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
        ;;
    *) fail "CONTAINER_ENGINE must be docker or podman, not '$ENGINE'" ;;
esac
command -v python3 >/dev/null || fail "python3 is needed on the host to check the answers"

# The flags podman needs on this kind of machine (see ../shared/DESIGN.md, containers): the runc
# runtime, explicit ulimits and the host network; the host CA bundle is mounted into build steps so
# pip can reach the package index over TLS. Docker uses its defaults and a published port.
ENGINE_CMD=("$ENGINE")
BUILD_FLAGS=()
BASE_RUN_FLAGS=()
RUN_FLAGS=()
if [ "$ENGINE" = podman ]; then
    ENGINE_CMD+=(--runtime runc)
    LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network host)
    BUILD_FLAGS+=(--format docker "${LIMITS[@]}")
    [ -f "$CA_BUNDLE" ] && BUILD_FLAGS+=(-v "$CA_BUNDLE:$CA_BUNDLE:ro")
    BASE_RUN_FLAGS+=("${LIMITS[@]}")
    RUN_FLAGS+=("${LIMITS[@]}" -e "DEEPMAD_PORT=$PORT")
else
    RUN_FLAGS+=(-p "127.0.0.1:$PORT:8000")
fi
engine() { "${ENGINE_CMD[@]}" "$@"; }
# Run an engine command, hiding stdout and podman's complaints that there is no systemd to schedule
# HEALTHCHECK timers (a later step runs the check itself); any other stderr line is shown.
engine_quiet() {
    local err status=0
    err="$(engine "$@" 2>&1 >/dev/null)" || status=$?
    printf '%s\n' "$err" | grep -v -e '^$' -e 'systemd connection' | sed 's/^/    /' >&2 || true
    return "$status"
}
info "$("$ENGINE" --version)"

# ---------------------------------------------------------------------------------------------------
step "Inputs: the shipped model and real photos"
if [ ! -f models/trashnet/model.onnx ] || [ ! -f models/trashnet/manifest.json ]; then
    fail "models/trashnet/{model.onnx,manifest.json} not found: train or check out the shipped model first"
fi
info "model: models/trashnet ($(du -h models/trashnet/model.onnx | cut -f1) model.onnx)"
[ -d "$DATA_ROOT/trashnet" ] || fail "TrashNet not found at $DATA_ROOT/trashnet (set DEEPMAD_DATA_ROOT)"
PHOTOS=()
for cls in glass trash; do
    photo="$(find "$DATA_ROOT/trashnet/$cls" -maxdepth 1 -name '*.jpg' | sort)"
    photo="${photo%%$'\n'*}"
    [ -n "$photo" ] || fail "no .jpg in $DATA_ROOT/trashnet/$cls"
    PHOTOS+=("$photo")
    info "photo: $photo"
done

# ---------------------------------------------------------------------------------------------------
step "Base image"
BASE="${BASE_IMAGE:-}"
if [ -z "$BASE" ]; then
    if engine image inspect "$DEFAULT_BASE" >/dev/null 2>&1 || engine pull -q "$DEFAULT_BASE" >/dev/null 2>&1; then
        BASE="$DEFAULT_BASE"
        info "using $BASE"
    elif [ "$ENGINE" = podman ]; then
        info "$DEFAULT_BASE cannot be pulled here: using a local stand-in, $STANDIN_IMAGE"
        BASE="$STANDIN_IMAGE"
        if engine image inspect "$STANDIN_IMAGE" >/dev/null 2>&1; then
            info "stand-in already built"
        else
            command -v debootstrap >/dev/null || apt_install debootstrap
            ROOTFS="$(mktemp -d /tmp/deepmad-standin.XXXXXX)"
            info "debootstrap bookworm into $ROOTFS (about a minute)"
            $SUDO debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
                bookworm "$ROOTFS/root" "$DEBIAN_MIRROR" >"$ROOTFS/debootstrap.log" 2>&1 \
                || { tail -n 20 "$ROOTFS/debootstrap.log" >&2; fail "debootstrap failed"; }
            # Like the slim image: no apt lists, package cache, docs or translations.
            $SUDO tar -C "$ROOTFS/root" --numeric-owner \
                --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' \
                --exclude='./var/cache/apt/*' --exclude='./var/lib/apt/lists/*' \
                --exclude='./usr/share/doc/*' --exclude='./usr/share/man/*' --exclude='./usr/share/locale/*' \
                -c . | engine import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$STANDIN_IMAGE" >/dev/null
            $SUDO rm -rf "$ROOTFS"
            info "imported $STANDIN_IMAGE"
        fi
    else
        fail "$DEFAULT_BASE cannot be pulled; set BASE_IMAGE to a local Debian image with python3 and python3-venv"
    fi
else
    info "using BASE_IMAGE=$BASE"
fi
info "$(engine run --rm "${BASE_RUN_FLAGS[@]}" --entrypoint python3 "$BASE" -c 'import sys; print("base python", sys.version.split()[0], "at", sys.executable)')"

# ---------------------------------------------------------------------------------------------------
step "Build $IMAGE from docker/Dockerfile"
build_log="$(mktemp /tmp/deepmad-smoke-build.XXXXXX.log)"
started=$SECONDS
if ! engine build "${BUILD_FLAGS[@]}" --build-arg "BASE_IMAGE=$BASE" -f docker/Dockerfile -t "$IMAGE" . >"$build_log" 2>&1; then
    tail -n 40 "$build_log" >&2
    fail "image build failed (full log: $build_log)"
fi
grep -E 'serve env ok' "$build_log" | tail -n 1 | sed 's/^/    /' || true
rm -f "$build_log"
size_bytes="$(engine image inspect --format '{{.Size}}' "$IMAGE")"
info "built in $((SECONDS - started)) s; image size $((size_bytes / 1000000)) MB"

# ---------------------------------------------------------------------------------------------------
cleanup() {
    local status=$?
    if engine container inspect "$CONTAINER" >/dev/null 2>&1; then
        if [ "$status" != 0 ]; then
            printf '\n--- container log (last 40 lines) ---\n' >&2
            engine logs --tail 40 "$CONTAINER" >&2 2>&1 || true
        fi
        engine rm -f "$CONTAINER" >/dev/null 2>&1 || true
    fi
    if [ "$KEEP_IMAGE" = 0 ]; then engine rmi -f "$IMAGE" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

step "Run $CONTAINER (read-only root, tmpfs /tmp, as in docker-compose.yml)"
engine_quiet run -d --name "$CONTAINER" "${RUN_FLAGS[@]}" \
    --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
    -e "DEEPMAD_ADMIN_TOKEN=$ADMIN_TOKEN" "$IMAGE" || fail "could not start the container"
info "user in container: $(engine exec "$CONTAINER" id)"

# ---------------------------------------------------------------------------------------------------
step "Wait for http://127.0.0.1:$PORT/readyz"
started=$SECONDS
ready=""
while [ $((SECONDS - started)) -lt 90 ]; do
    if [ "$(engine inspect --format '{{.State.Running}}' "$CONTAINER")" != true ]; then
        fail "the container exited (status $(engine inspect --format '{{.State.ExitCode}}' "$CONTAINER"))"
    fi
    if ready="$(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' \
        "http://127.0.0.1:$PORT/readyz" 2>/dev/null)"; then
        break
    fi
    ready=""
    sleep 0.5
done
[ -n "$ready" ] || fail "the service did not become ready within 90 s"
info "ready after $((SECONDS - started)) s: $ready"

# ---------------------------------------------------------------------------------------------------
step "Classify real photos and check the verdicts"
BASE_URL="http://127.0.0.1:$PORT" ADMIN_TOKEN="$ADMIN_TOKEN" python3 - "${PHOTOS[@]}" <<'PY' || fail "a check on the answers failed"
import json, math, os, sys, urllib.error, urllib.request, uuid

base = os.environ["BASE_URL"]
problems = []


def call(method, path, body=None, headers=None):
    request = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def check(condition, message):
    print(f"    {'ok  ' if condition else 'FAIL'} {message}")
    if not condition:
        problems.append(message)


status, model = call("GET", "/model")
check(status == 200, f"GET /model -> {status}")
classes = list(model.get("class_names") or []) if status == 200 else []
check(len(classes) > 0, f"model classes: {classes}")
summary = {key: model.get(key) for key in ("name", "version", "method", "threshold", "providers")}
print(f"    model: {json.dumps(summary)}")

for path in sys.argv[1:]:
    with open(path, "rb") as fh:
        photo = fh.read()
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{os.path.basename(path)}\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + photo + f"\r\n--{boundary}--\r\n".encode()
    status, answer = call("POST", "/classify", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    label = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
    print(f"    POST /classify {label} ({len(photo)} bytes) -> {status}")
    print(f"    {json.dumps(answer)}")
    check(status == 200, "status 200")
    if status != 200:
        continue
    check(answer.get("verdict") in ("normal", "anomalous"), f"verdict is normal/anomalous: {answer.get('verdict')}")
    score, threshold = answer.get("score"), answer.get("threshold")
    check(isinstance(score, float) and math.isfinite(score), f"score is a finite number: {score}")
    check(isinstance(threshold, float) and math.isfinite(threshold), f"threshold is a finite number: {threshold}")
    if isinstance(score, float) and isinstance(threshold, float):
        expected = "anomalous" if score >= threshold else "normal"
        check(answer.get("verdict") == expected, f"verdict agrees with score {score:.4f} vs threshold {threshold:.4f}")
    distances = answer.get("distances") or {}
    check(isinstance(distances, dict) and len(distances) > 0, f"distances for {len(distances)} classes")
    if classes:
        check(sorted(distances) == sorted(classes), "distances cover the model's classes")
    check(answer.get("nearest_class") in distances, f"nearest_class {answer.get('nearest_class')!r} is one of them")
    if distances and answer.get("nearest_class") in distances:
        check(
            distances[answer["nearest_class"]] == min(distances.values()),
            "nearest_class has the smallest distance",
        )
    ref = answer.get("model") or {}
    check(bool(ref.get("name")) and bool(ref.get("version")), f"model {ref.get('name')} {ref.get('version')}")

status, answer = call("POST", "/classify", b"definitely not a jpeg", {"Content-Type": "image/jpeg"})
print(f"    POST /classify (garbage bytes) -> {status} {json.dumps(answer)}")
check(status == 400 and "error" in (answer or {}), "bad input is a 400 with an error body, not a 5xx")

status, answer = call("POST", "/admin/reload", b"", {"Authorization": f"Bearer {os.environ['ADMIN_TOKEN']}"})
print(f"    POST /admin/reload -> {status} {json.dumps(answer)}")
check(status == 200 and answer.get("status") == "reloaded", "reload with the admin token works")

request = urllib.request.Request(base + "/metrics")
with urllib.request.urlopen(request, timeout=5) as response:
    metrics = response.read().decode()
served = [line for line in metrics.splitlines() if line.startswith("deepmad_classifications_total")]
for line in served:
    print(f"    {line}")
check(sum(float(line.rsplit(" ", 1)[1]) for line in served) == len(sys.argv) - 1, "/metrics counts the photos")

if problems:
    print(f"    {len(problems)} check(s) failed")
    raise SystemExit(1)
PY

# ---------------------------------------------------------------------------------------------------
step "SIGHUP reloads the model in the running container"
engine kill -s HUP "$CONTAINER" >/dev/null
reloaded=""
for _ in $(seq 1 40); do
    reloaded="$(python3 -c 'import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=2).read().decode()
print(next((l for l in text.splitlines() if l.startswith("deepmad_reloads_total{trigger=\"sighup\"} ")), ""))' \
        "http://127.0.0.1:$PORT/metrics" 2>/dev/null || true)"
    [ "$reloaded" = 'deepmad_reloads_total{trigger="sighup"} 1.0' ] && break
    sleep 0.25
done
[ "$reloaded" = 'deepmad_reloads_total{trigger="sighup"} 1.0' ] || fail "no SIGHUP reload counted (got: '$reloaded')"
info "$reloaded"
info "still serving: $(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "http://127.0.0.1:$PORT/readyz")"

# ---------------------------------------------------------------------------------------------------
step "The image's HEALTHCHECK"
if [ "$ENGINE" = podman ]; then
    engine healthcheck run "$CONTAINER" >/dev/null || fail "podman healthcheck run: unhealthy"
    info "podman healthcheck run: healthy"
else
    health=""
    for _ in $(seq 1 60); do
        health="$(docker inspect --format '{{.State.Health.Status}}' "$CONTAINER")"
        [ "$health" = healthy ] && break
        sleep 1
    done
    [ "$health" = healthy ] || fail "docker health status: $health"
    info "docker health status: healthy"
fi

# ---------------------------------------------------------------------------------------------------
step "The pretrained model in the same image (DEEPMAD_MODEL_DIR=/models/trashnet-lite0)"
PRETRAINED="$CONTAINER-lite0"
PRETRAINED_PORT=$((PORT + 1))
PRETRAINED_FLAGS=("${RUN_FLAGS[@]/$PORT/$PRETRAINED_PORT}")  # the published port (docker) or DEEPMAD_PORT (podman)
engine_quiet run -d --name "$PRETRAINED" "${PRETRAINED_FLAGS[@]}" --read-only --tmpfs /tmp --cap-drop ALL \
    --security-opt no-new-privileges -e DEEPMAD_MODEL_DIR=/models/trashnet-lite0 "$IMAGE" \
    || fail "could not start the pretrained-model container"
EXPECTED_SIZE="$(python3 -c 'import json; print(json.load(open("models/trashnet-lite0/manifest.json"))["input"]["height"])')"
BASE_URL="http://127.0.0.1:$PRETRAINED_PORT" EXPECTED_SIZE="$EXPECTED_SIZE" python3 - "${PHOTOS[@]}" <<'PY' || { engine logs --tail 20 "$PRETRAINED" >&2; engine rm -f "$PRETRAINED" >/dev/null; fail "the pretrained model did not answer"; }
import json, os, sys, time, urllib.request, uuid

base = os.environ["BASE_URL"]
for _ in range(180):
    try:
        urllib.request.urlopen(base + "/readyz", timeout=2)
        break
    except OSError:
        time.sleep(0.5)
model = json.loads(urllib.request.urlopen(base + "/model", timeout=5).read())
expected = int(os.environ["EXPECTED_SIZE"])
assert model["input"]["height"] == expected and model["backbone"]["name"] == "efficientnet-lite0", model["input"]
print(f"    model: {model['name']} {model['version']}, input {model['input']}, backbone {model['backbone']['name']}")
for path in sys.argv[1:]:
    boundary = uuid.uuid4().hex
    photo = open(path, "rb").read()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(base + "/classify", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
    assert answer["verdict"] in ("normal", "anomalous") and len(answer["distances"]) == 5, answer
    print(f"    {os.path.basename(os.path.dirname(path))}: {answer['verdict']}, nearest {answer['nearest_class']}")
PY
engine_quiet rm -f "$PRETRAINED"

# ---------------------------------------------------------------------------------------------------
step "The bin's self-check in the image ($IMAGE check)"
check_out="$(engine run --rm "${BASE_RUN_FLAGS[@]}" --read-only --tmpfs /tmp "$IMAGE" check -n 20 2>&1)" \
    || { printf '%s\n' "$check_out" | sed 's/^/    /' >&2; fail "the self-check failed in the image"; }
printf '%s\n' "$check_out" | grep -E '^(golden|summary):' | sed 's/^/    /'
printf '%s\n' "$check_out" | grep -q '^summary: .*golden=verified' || fail "no verified summary line from check"

# ---------------------------------------------------------------------------------------------------
step "Stop and remove the container"
started=$SECONDS
engine_quiet stop -t 15 "$CONTAINER"
info "stopped in $((SECONDS - started)) s; exit code $(engine inspect --format '{{.State.ExitCode}}' "$CONTAINER")"
info "last log lines:"
engine logs --tail 4 "$CONTAINER" 2>&1 | sed 's/^/      /'
engine_quiet rm "$CONTAINER"
trap - EXIT
if [ "$KEEP_IMAGE" = 0 ]; then engine rmi -f "$IMAGE" >/dev/null; info "removed $IMAGE"; fi

# ---------------------------------------------------------------------------------------------------
# The same Dockerfile for linux/arm64 (a Raspberry Pi's bin controller), built and run under qemu-user.
# qemu-user shows the container the host's /proc/cpuinfo and /sys CPU list, and ONNX Runtime's cpuinfo
# crashes on those x86 descriptions; an empty file and folder over them make it read the emulated core's
# features from its hwcaps instead (a real Pi needs none of this).
ARM64_SUMMARY="not built"
ARM64="${SMOKE_ARM64:-1}"
if [ "$ARM64" != 0 ] && [ "$(uname -m)" = x86_64 ]; then
    step "The image for linux/arm64, under emulation (QEMU_CPU=${QEMU_CPU:-cortex-a72})"
    ARM64_ROOT="${DEEPMAD_ARM64_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/deepmad-bin/arm64-root}"
    # The arm64 root of the test suite: qemu-user-static and binfmt set up, or one line saying why not.
    tests/arm64/make-root.sh | sed 's/^/    /'
    if [ -f "$ARM64_ROOT.unavailable" ]; then
        ARM64_SUMMARY="skipped: $(cat "$ARM64_ROOT.unavailable")"
        info "arm64 $ARM64_SUMMARY"
    else
        ARM_IMAGE="$IMAGE-arm64"
        ARM_BASE="${BASE_IMAGE_ARM64:-}"
        if [ -z "$ARM_BASE" ]; then
            if engine pull -q --platform linux/arm64 "$DEFAULT_BASE" >/dev/null 2>&1; then
                ARM_BASE="$DEFAULT_BASE"
            elif [ "$ENGINE" = podman ]; then
                ARM_BASE="$STANDIN_IMAGE-arm64"
                info "$DEFAULT_BASE for arm64 cannot be pulled here: using a stand-in from $ARM64_ROOT"
                if engine image inspect "$ARM_BASE" >/dev/null 2>&1; then
                    info "stand-in already built"
                else  # the Debian part of that root (its /opt holds the test suite's venv: left out)
                    $SUDO tar -C "$ARM64_ROOT" --numeric-owner \
                        --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' --exclude='./tmp/*' \
                        --exclude='./opt/*' --exclude='./var/cache/apt/*' --exclude='./var/lib/apt/lists/*' \
                        --exclude='./usr/share/doc/*' --exclude='./usr/share/man/*' --exclude='./usr/share/locale/*' \
                        -c . | engine import --arch arm64 --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
                            - "$ARM_BASE" >/dev/null 2>&1
                fi
            else
                fail "$DEFAULT_BASE cannot be pulled for linux/arm64; set BASE_IMAGE_ARM64 to a local arm64 Debian image"
            fi
        fi
        info "base: $ARM_BASE"
        build_log="$(mktemp /tmp/deepmad-smoke-arm64-build.XXXXXX.log)"
        started=$SECONDS
        if ! engine build --platform linux/arm64 "${BUILD_FLAGS[@]}" --build-arg "BASE_IMAGE=$ARM_BASE" \
            -f docker/Dockerfile -t "$ARM_IMAGE" . >"$build_log" 2>&1; then
            tail -n 40 "$build_log" >&2
            fail "arm64 image build failed (full log: $build_log)"
        fi
        grep -E 'serve env ok' "$build_log" | tail -n 1 | sed 's/^/    /' || true
        rm -f "$build_log"
        info "built in $((SECONDS - started)) s: $(engine image inspect --format '{{.Architecture}}' "$ARM_IMAGE")"

        MASKS="$(mktemp -d /tmp/deepmad-smoke-masks.XXXXXX)"
        mkdir "$MASKS/cpu" && : >"$MASKS/cpuinfo"
        EMULATED=(--platform linux/arm64 -e "QEMU_CPU=${QEMU_CPU:-cortex-a72}"
                  -v "$MASKS/cpuinfo:/proc/cpuinfo:ro" -v "$MASKS/cpu:/sys/devices/system/cpu:ro")
        ARM_CONTAINER="$CONTAINER-arm64"
        ARM_PORT=$((PORT + 2))
        ARM_FLAGS=("${RUN_FLAGS[@]/$PORT/$ARM_PORT}")
        trap 'engine rm -f "$ARM_CONTAINER" >/dev/null 2>&1 || true; rm -rf "$MASKS"' EXIT
        engine_quiet run -d --name "$ARM_CONTAINER" "${ARM_FLAGS[@]}" "${EMULATED[@]}" --read-only --tmpfs /tmp \
            --cap-drop ALL --security-opt no-new-privileges "$ARM_IMAGE" || fail "could not start the arm64 container"
        BASE_URL="http://127.0.0.1:$ARM_PORT" python3 - "${PHOTOS[@]}" <<'PY' || { engine logs --tail 20 "$ARM_CONTAINER" >&2; fail "the arm64 image did not answer"; }
import json, os, sys, time, urllib.request, uuid

base = os.environ["BASE_URL"]
deadline = time.monotonic() + 600  # emulated: imports and the golden check take minutes, not seconds
while True:
    try:
        urllib.request.urlopen(base + "/readyz", timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise SystemExit("    not ready after 600 s")
        time.sleep(2)
model = json.loads(urllib.request.urlopen(base + "/model", timeout=30).read())
assert model["golden"]["status"] == "verified", model["golden"]
print(f"    model: {model['name']} {model['version']}, golden scores {model['golden']['status']} on the emulated core")
for path in sys.argv[1:]:
    boundary = uuid.uuid4().hex
    photo = open(path, "rb").read()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(base + "/classify", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
    assert answer["verdict"] in ("normal", "anomalous") and answer["nearest_class"] in answer["distances"], answer
    print(f"    {os.path.basename(os.path.dirname(path))}: {answer['verdict']}, nearest {answer['nearest_class']}, "
          f"score {answer['score']:.4f}")
PY
        engine kill "$ARM_CONTAINER" >/dev/null 2>&1 || true  # emulated, it outlived podman's 10 s SIGTERM wait here
        engine_quiet rm -f "$ARM_CONTAINER"
        check_out="$(engine run --rm "${BASE_RUN_FLAGS[@]}" "${EMULATED[@]}" --read-only --tmpfs /tmp "$ARM_IMAGE" check -n 3 2>&1)" \
            || { printf '%s\n' "$check_out" | sed 's/^/    /' >&2; fail "the self-check failed in the arm64 image"; }
        ARM64_SUMMARY="$(printf '%s\n' "$check_out" | grep '^summary:')" || fail "no summary line from check in the arm64 image"
        info "$ARM64_SUMMARY"
        rm -rf "$MASKS"
        trap - EXIT
        if [ "$KEEP_IMAGE" = 0 ]; then engine rmi -f "$ARM_IMAGE" >/dev/null; info "removed $ARM_IMAGE"; fi
        ARM64_SUMMARY="answered real photos; arm64 self-check: ${ARM64_SUMMARY#summary: }"
    fi
fi

printf '\nSMOKE TEST PASSED: %s (%s, base %s, %d MB) answered real photos; linux/arm64: %s\n' \
    "$IMAGE" "$ENGINE" "$BASE" "$((size_bytes / 1000000))" "$ARM64_SUMMARY"
