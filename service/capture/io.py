"""Group commit for captures, in a helper process: a batch of captures made durable with one round trip.

Why a process: in the service, every system call of the writer thread (open, write, fsync, rename, ...)
gives up the GIL, and getting it back behind a busy event loop takes up to the switch interval (5 ms).
With ~12 such calls per file the writer managed ~35 captures/s under load. Here the parent hands over a
whole batch in one pipe write and waits for one reply; this process, whose GIL nobody else wants, does
the file work:

1. each file of the batch into a hidden ``.<name>.*.tmp`` beside its target (``.tmp`` files are cleared
   by ``CaptureStore.open``);
2. ``fsync`` of every temporary file, in parallel (concurrent fsyncs share one journal commit);
3. ``rename`` (every image, then every sidecar: a capture exists iff its sidecar does);
4. one ``fsync`` per folder touched (the capture root too, for a new day's folder).

A capture is reported ``written`` only after step 4. The process ignores SIGINT/SIGTERM (the parent
drains its queue on shutdown, then closes the pipe) and exits on end of file: when the parent is killed,
it ends too, and a batch it has not renamed yet is deleted rather than left for a restart to find.

Only the standard library is imported here: the process starts in a few tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HEADER = struct.Struct("<Q")
F_SETPIPE_SZ = 1031  # Linux: a 1 MiB pipe takes a whole batch in one write
PIPE_BYTES = 1 << 20
FSYNC_THREADS = 16  # fsyncs in flight at once: the journal commits them together
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])

# One capture to write: (folder, image name, image bytes, sidecar name, sidecar bytes).
CaptureFiles = tuple[str, str, bytes, str, bytes]
# Its outcome: ("written", (inode, size, mtime_ns) of the sidecar), ("duplicate_id", None), ("write_error", why).
Outcome = tuple[str, object]


def send(fd: int, value: object) -> None:
    """One length-prefixed pickle; a single ``write`` when the pipe has room for it."""
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(HEADER.pack(len(payload)) + payload)
    while view:
        view = view[os.write(fd, view) :]


def receive(fd: int) -> object:
    """The next message, or raise EOFError when the other side has closed the pipe."""
    (size,) = HEADER.unpack(_read_exactly(fd, HEADER.size))
    return pickle.loads(_read_exactly(fd, size))


def _read_exactly(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, PIPE_BYTES))
        if not chunk:
            raise EOFError("pipe closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def widen_pipe(fd: int) -> None:
    with contextlib.suppress(OSError):  # over /proc/sys/fs/pipe-max-size: a batch then takes a few writes
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_BYTES)


# ---- the helper process ----


@dataclass
class _Staged:
    """One capture's temporary files (image, sidecar) on their way to their names."""

    index: int
    folder: str
    files: list[tuple[int, str, str]] = field(default_factory=list)  # (fd, temporary path, final path)

    def discard(self) -> None:
        for fd, tmp, _ in self.files:
            if fd >= 0:
                os.close(fd)
            _unlink(tmp)
        self.files = [(-1, tmp, final) for _, tmp, final in self.files]


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stage(index: int, capture: CaptureFiles, folders: set[str], created: set[str]) -> _Staged | Outcome:
    """Write both files of one capture to temporary files (not yet fsynced), or say why not.

    The temporary names are the final ones plus this process's id: a capture's name is unique, so no
    random name (``mkstemp``) is needed, and ``os.open``'s mode is masked by the umask like any file's."""
    folder, image_name, image, sidecar_name, sidecar = capture
    if folder not in folders:
        if not os.path.isdir(folder):
            os.mkdir(folder)  # the day's first capture (FileExistsError for a file in the way: a write_error)
            created.add(folder)
        folders.add(folder)
    if os.path.exists(os.path.join(folder, sidecar_name)):
        return ("duplicate_id", None)
    staged = _Staged(index, folder)
    try:
        for name, data in ((image_name, image), (sidecar_name, sidecar)):
            tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
            staged.files.append((fd, tmp, os.path.join(folder, name)))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
    except BaseException:
        staged.discard()
        raise
    return staged


def _fsync_and_close(fd: int) -> OSError | None:
    """fsync then close one file; the error instead of raising it (one failed file fails its capture only)."""
    try:
        os.fsync(fd)
    except OSError as exc:
        return exc
    finally:
        os.close(fd)
    return None


def _fsync_all(fds: list[int], pool: ThreadPoolExecutor) -> dict[int, OSError | None]:
    """fsync every file, ``FSYNC_THREADS`` at a time (concurrent fsyncs share one journal commit); one
    task per thread, not per file: submitting a future per file cost more than the fsyncs themselves."""
    chunks = [fds[start::FSYNC_THREADS] for start in range(min(FSYNC_THREADS, len(fds)))]
    results = pool.map(lambda chunk: [(fd, _fsync_and_close(fd)) for fd in chunk], chunks)
    return {fd: error for chunk in results for fd, error in chunk}


def write_batch(
    captures: list[CaptureFiles], pool: ThreadPoolExecutor, parent_alive: Callable[[], bool]
) -> list[Outcome]:
    """Steps 1-4 of the module docstring for a batch; one outcome per capture, in order."""
    outcomes: list[Outcome | None] = [None] * len(captures)
    staged: list[_Staged] = []
    folders: set[str] = set()
    created: set[str] = set()
    for index, capture in enumerate(captures):
        try:
            result = _stage(index, capture, folders, created)
        except OSError as exc:
            result = ("write_error", f"{capture[0]}: {exc}")
        if isinstance(result, _Staged):
            staged.append(result)
        else:
            outcomes[index] = result
    fds = [fd for item in staged for fd, _, _ in item.files]
    errors = _fsync_all(fds, pool)
    synced = []
    for item in staged:
        problems = [f"{final}: {errors[fd]}" for fd, _, final in item.files if errors[fd] is not None]
        item.files = [(-1, tmp, final) for _, tmp, final in item.files]
        if problems:
            item.discard()
            outcomes[item.index] = ("write_error", problems[0])
        else:
            synced.append(item)
    if not parent_alive():  # killed meanwhile: nobody will hear of this batch, leave nothing behind
        for item in synced:
            item.discard()
        raise EOFError("the service is gone")
    _publish(synced, outcomes, created)
    return [outcome if outcome is not None else ("write_error", "not written") for outcome in outcomes]


def _rename(item: _Staged, position: int, outcomes: list[Outcome | None]) -> bool:
    """Rename one of the capture's files (0: image, 1: sidecar); on failure remove what it had made."""
    _, tmp, final = item.files[position]
    try:
        os.replace(tmp, final)
    except OSError as exc:
        item.discard()
        if position == 1:
            _unlink(item.files[0][2])  # its image is in place already
        outcomes[item.index] = ("write_error", f"{final}: {exc}")
        return False
    return True


def _publish(synced: list[_Staged], outcomes: list[Outcome | None], created: set[str]) -> None:
    """Rename every image, then every sidecar, then fsync each folder once; a capture whose folder fsync
    failed is removed again (it was never durable, and is reported as a write_error)."""
    images = [item for item in synced if _rename(item, 0, outcomes)]
    done = [item for item in images if _rename(item, 1, outcomes)]
    folders = {item.folder for item in done} | created | {os.path.dirname(folder) for folder in created}
    failed: dict[str, str] = {}
    for folder in sorted(folders):
        try:
            _fsync_folder(folder)
        except OSError as exc:
            failed[folder] = f"{folder}: {exc}"
    for item in done:
        image, sidecar = item.files[0][2], item.files[1][2]
        if item.folder in failed:
            _unlink(sidecar)
            _unlink(image)
            outcomes[item.index] = ("write_error", failed[item.folder])
            continue
        stat = os.stat(sidecar)
        outcomes[item.index] = ("written", (stat.st_ino, stat.st_size, stat.st_mtime_ns))


def serve(requests: int, replies: int) -> None:
    """Answer batches until the parent closes its end (or dies)."""
    parent = os.getppid()
    with ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="fsync") as pool:
        while True:
            try:
                captures = receive(requests)
                send(replies, write_batch(captures, pool, lambda: os.getppid() == parent))
            except (EOFError, BrokenPipeError):
                return


# ---- the service's side ----


class BatchWriterProcess:
    """The helper process seen from the service: ``write`` one batch, get its outcomes once durable.

    Called from one thread (the capture writer). A helper that died is started again for the next batch;
    the batch it was writing is reported as ``write_error`` (its files, if any, are cleared at restart)."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._requests = self._replies = -1

    def start(self) -> None:
        request_read, self._requests = os.pipe()
        self._replies, reply_write = os.pipe()
        widen_pipe(self._requests)
        widen_pipe(self._replies)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")])),
        }
        command = [sys.executable, "-m", "service.capture.io", str(request_read), str(reply_write)]
        try:
            self._process = subprocess.Popen(command, pass_fds=(request_read, reply_write), env=env)
        finally:
            os.close(request_read)
            os.close(reply_write)

    def write(self, captures: list[CaptureFiles]) -> list[Outcome]:
        if self._process is None or self._process.poll() is not None:
            self.close()
            self.start()
        try:
            send(self._requests, captures)
            outcomes = receive(self._replies)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self.close()
            return [("write_error", f"capture writer process failed: {exc}")] * len(captures)
        return outcomes  # type: ignore[return-value]

    def close(self) -> None:
        """Close the pipe (the helper finishes its batch and exits) and reap it."""
        for fd in (self._requests, self._replies):
            if fd >= 0:
                os.close(fd)
        self._requests = self._replies = -1
        if self._process is not None:
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole process group: the parent drains
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(int(sys.argv[1]), int(sys.argv[2]))
