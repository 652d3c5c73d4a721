"""Many measurement runs at once: in worker processes (:func:`run_many`) and over an lr grid with
further seeds at the chosen lr (:func:`run_lr_grid`), the machinery of every suite behind
``scripts/reproduce.py``. One run is :func:`timm_ortho.train.experiments.run`.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .experiments import RunConfig, best_by_loss, run
from .tensor_data import load_tensor_data

__all__ = ["GridResult", "run_lr_grid", "run_many"]


# Each process's data sets, loaded once and kept for the runs that follow.
_cached_data = functools.cache(load_tensor_data)


def _run_job(
    cfg: RunConfig, data_kwargs: dict[str, Any], device: str, deadline_at: float | None, threads: int | None
) -> dict[str, Any] | None:
    """One run on the data ``data_kwargs`` describe; None past the deadline. ``threads``: a worker
    process's share of the cores (None: this process, its threads left as they are)."""
    if deadline_at is not None and time.time() >= deadline_at:
        return None
    if threads is not None:
        torch.set_num_threads(threads)
    return run(cfg, _cached_data(**data_kwargs), device)


def _exit_with_parent(parent: int, poll_seconds: float = 1.0) -> None:
    """Worker initializer: end this worker as soon as ``parent``, the process that started it, is gone
    (it is given, not read here, because the parent may already be gone when a worker starts).

    A suite stopped by a signal to its own process (``kill``, a job scheduler's SIGTERM, a timeout)
    does not stop its pool: each worker would go on with its current run, up to half an hour at 1202
    layers, holding a core that the next call needs. The watch is one system call a second in a
    sleeping thread; it touches nothing a run computes, so the records are the same bit for bit."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)  # reparented: the suite is gone and nobody will read this run's record

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def run_many(
    configs: Sequence[RunConfig],
    data_kwargs: dict[str, Any] | Sequence[dict[str, Any]],
    device: str = "cpu",
    jobs: int = 1,
    *,
    deadline: float | None = None,
    on_result: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any] | None]:
    """Run independent configurations, in ``jobs`` worker processes when > 1; records in ``configs`` order.

    Args:
        configs: the runs.
        data_kwargs: the arguments of :func:`load_tensor_data`, one dict for every run or one per run;
            each process loads each data set once and keeps it.
        device: where every run trains; worker processes share it (on a CPU each gets an equal share
            of the cores as threads).
        jobs: worker processes (spawned); 1 runs everything in this process.
        deadline: seconds from now after which no run starts; a run not started gives ``None``.
        on_result: ``on_result(index, record)`` as each run finishes, in the order they finish (to
            save what finished if the whole is cut short, or to advance a progress bar).
    """
    per_run = [data_kwargs] * len(configs) if isinstance(data_kwargs, dict) else list(data_kwargs)
    if len(per_run) != len(configs):
        raise ValueError(f"{len(per_run)} data_kwargs for {len(configs)} configs")
    deadline_at = None if deadline is None else time.time() + deadline
    records: list[dict[str, Any] | None] = [None] * len(configs)

    def finished(index: int, record: dict[str, Any] | None) -> None:
        records[index] = record
        if record is not None and on_result is not None:
            on_result(index, record)

    if jobs <= 1:
        for i, (cfg, kwargs) in enumerate(zip(configs, per_run, strict=True)):
            finished(i, _run_job(cfg, kwargs, device, deadline_at, None))
        return records
    import concurrent.futures
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // jobs) if device == "cpu" else 1
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_exit_with_parent, initargs=(os.getpid(),)
    )
    with pool:
        futures = {
            pool.submit(_run_job, cfg, kwargs, device, deadline_at, threads): i
            for i, (cfg, kwargs) in enumerate(zip(configs, per_run, strict=True))
        }
        for future in concurrent.futures.as_completed(futures):
            finished(futures[future], future.result())
    return records


@dataclass
class GridResult:
    """One cell of a suite run over a learning-rate grid (see :func:`run_lr_grid`)."""

    lr: float
    """The grid's lr with the lowest final training loss on the first seed."""
    seeds: list[dict[str, Any] | None]
    """The records at that lr, one per seed (the first seed's from the grid); None: not run (deadline)."""
    grid: list[dict[str, Any] | None]
    """The first seed's records at every lr of the grid, in grid order."""


def _run_phase(
    plan: list[tuple[int, RunConfig]],
    data: Sequence[dict[str, Any]],
    device: str,
    jobs: int,
    deadline: float | None,
    on_result: Callable[[int, dict[str, Any]], None] | None,
    known: Callable[[int, RunConfig], dict[str, Any] | None] | None,
) -> list[dict[str, Any] | None]:
    """One phase of :func:`run_lr_grid`: the runs ``(cell index, config)`` of ``plan`` that ``known`` does
    not already hold, together in ``jobs`` processes; the records in ``plan``'s order."""
    records = [None if known is None else known(i, cfg) for i, cfg in plan]
    missing = [k for k, r in enumerate(records) if r is None]

    def finished(index: int, record: dict[str, Any]) -> None:
        if on_result is not None:
            on_result(plan[missing[index]][0], record)

    ran = run_many(
        [plan[k][1] for k in missing],
        [data[plan[k][0]] for k in missing],
        device,
        jobs,
        deadline=deadline,
        on_result=finished,
    )
    for k, record in zip(missing, ran, strict=True):
        records[k] = record
    return records


def run_lr_grid(
    cells: Sequence[tuple[RunConfig, dict[str, Any]]],
    lrs: Sequence[float],
    seeds: Sequence[int],
    device: str = "cpu",
    jobs: int = 1,
    *,
    deadline: float | None = None,
    on_result: Callable[[int, dict[str, Any]], None] | None = None,
    known: Callable[[int, RunConfig], dict[str, Any] | None] | None = None,
) -> list[GridResult]:
    """Every cell ``(config, data_kwargs)`` at each lr of ``lrs`` on the first seed, then the other seeds
    at the lr whose final training loss was lowest (diverged runs count as +inf).

    The selection reads no held-out data. Both phases run every cell's runs together in ``jobs``
    processes; ``on_result(cell index, record)`` is called as each run finishes. ``deadline``: seconds
    from now after which no run starts (its record is None; a cell whose grid did not finish runs no
    further seeds). ``known(cell index, config)``: a record saved by an earlier, interrupted call for
    that exact run, or None; known runs are not run again (nor passed to ``on_result``), so a suite
    resumes where it stopped and makes the same lr choices.
    """
    if not lrs or not seeds:
        raise ValueError("run_lr_grid needs at least one lr and one seed")
    stop_at = None if deadline is None else time.time() + deadline
    data = [data_kwargs for _, data_kwargs in cells]

    def phase(plan: list[tuple[int, RunConfig]]) -> list[dict[str, Any] | None]:
        left = None if stop_at is None else max(0.0, stop_at - time.time())
        return _run_phase(plan, data, device, jobs, left, on_result, known)

    first = [(i, replace(cfg, lr=lr, seed=seeds[0])) for i, (cfg, _) in enumerate(cells) for lr in lrs]
    grid = phase(first)
    per_cell = [grid[i * len(lrs) : (i + 1) * len(lrs)] for i in range(len(cells))]
    best = [
        None if any(r is None for r in records) else records.index(best_by_loss(records))  # type: ignore[arg-type]
        for records in per_cell
    ]
    rest = [
        (i, replace(cfg, lr=lrs[b], seed=seed))
        for i, ((cfg, _), b) in enumerate(zip(cells, best, strict=True))
        if b is not None
        for seed in seeds[1:]
    ]
    more = iter(phase(rest))
    results = []
    for records, b in zip(per_cell, best, strict=True):
        if b is None:
            results.append(GridResult(float("nan"), [None] * len(seeds), records))
            continue
        results.append(GridResult(lrs[b], [records[b], *(next(more) for _ in seeds[1:])], records))
    return results
