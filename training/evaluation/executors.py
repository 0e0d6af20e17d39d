"""Run many independent ``RunSpec``s: a local process pool or a Ray cluster, one task per run.

Both yield (spec, record or exception) as runs finish, so the caller writes each result as it arrives
and an interrupted sweep loses at most the runs in flight.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from training.errors import UserError
from training.evaluation.protocol import RunSpec, run_one

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_local(specs: list[RunSpec], workers: int) -> Iterator[tuple[RunSpec, dict | BaseException]]:
    """A spawn-context process pool (no torch state forked); at most ``workers`` runs at once."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending = {pool.submit(run_one, spec): spec for spec in specs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    spec = pending.pop(future)
                    error = future.exception()
                    yield spec, error if error is not None else future.result()
        finally:
            for future in pending:
                future.cancel()


def run_ray(
    specs: list[RunSpec], workers: int, threads: int, address: str | None
) -> Iterator[tuple[RunSpec, dict | BaseException]]:
    """Ray tasks of ``threads`` CPUs each: a local cluster of ``workers * threads`` CPUs, or ``address``'s.

    On a local cluster the workers import this checkout through PYTHONPATH; joining a cluster ships
    the checkout as the job's working_dir (Ray skips .gitignore'd paths). The data must be at the same
    path (or DEEPMAD_DATA_ROOT) on every node.
    """
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'ray>=2.9' (or the train extra)") from None
    env = {k: v for k, v in os.environ.items() if k.startswith("DEEPMAD_")}
    if address:
        runtime_env = {"working_dir": str(REPO_ROOT), "env_vars": env, "excludes": ["runs/", ".venv/", "models/"]}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        env["PYTHONPATH"] = str(REPO_ROOT)
        ray.init(
            num_cpus=workers * threads,
            include_dashboard=False,
            runtime_env={"env_vars": env},
            log_to_driver=False,
        )
    pending: dict = {}
    try:
        remote = ray.remote(num_cpus=threads, max_retries=0)(run_one)
        pending = {remote.remote(spec): spec for spec in specs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                spec = pending.pop(ref)
                try:
                    yield spec, ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - reported per run, the sweep goes on
                    yield spec, exc
    finally:
        for ref in pending:  # runs still queued when the sweep was interrupted
            ray.cancel(ref, force=True)
        ray.shutdown()
