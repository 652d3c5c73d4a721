"""Many measurement runs at once: in worker processes (:func:`run_many`) and over an lr grid with
further seeds at the chosen lr (:func:`run_lr_grid`), the machinery of every suite behind
``scripts/reproduce.py``. One run is :func:`timm_ortho.train.experiments.run`.

Runs go through one queue (:func:`_run_jobs`): a run that depends on others (a cell's further seeds
on its lr grid) is queued as soon as those have finished, so no process waits at the end of a batch
of runs for another's last one. A run that raises stops the queue without losing the runs under way.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import multiprocessing
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


Job = tuple[Any, RunConfig, dict[str, Any]]
"""One run to do: ``(key, config, data_kwargs)``; the key comes back with its record."""


def _run_jobs(
    jobs_to_run: Sequence[Job],
    device: str,
    processes: int,
    deadline_at: float | None,
    on_finish: Callable[[Any, dict[str, Any] | None], Sequence[Job]],
) -> None:
    """Run ``jobs_to_run`` and the further jobs that ``on_finish(key, record)`` returns as each one ends
    (record None: not started, past ``deadline_at``), in ``processes`` worker processes or, for 1, here.

    Jobs start in the order they were given, later ones after the earlier ones: a job that
    ``on_finish`` adds waits behind those already queued, but not for every one of them to end, so
    no process idles while another works through the end of a batch. If a run raises, the jobs not
    yet started are cancelled, the runs under way are finished and passed to ``on_finish`` (their
    work is kept; the jobs they add are not started), and the error is raised.
    """
    if processes <= 1:
        queue = collections.deque(jobs_to_run)
        while queue:
            key, cfg, kwargs = queue.popleft()
            queue.extend(on_finish(key, _run_job(cfg, kwargs, device, deadline_at, None)))
        return
    threads = max(1, (os.cpu_count() or 1) // processes) if device == "cpu" else 1
    pool = _worker_pool(processes)
    pending: dict[concurrent.futures.Future, Any] = {}

    def submit(jobs: Sequence[Job]) -> None:
        for key, cfg, kwargs in jobs:
            pending[pool.submit(_run_job, cfg, kwargs, device, deadline_at, threads)] = key

    def cancel_queued() -> None:  # a started run cannot be cancelled: it ends and is collected
        for future in pending:
            future.cancel()

    with pool:
        failure: BaseException | None = None
        try:
            submit(jobs_to_run)
            while pending:
                done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    key = pending.pop(future)
                    if future.cancelled():
                        continue
                    if future.exception() is not None:
                        if failure is None:
                            failure = future.exception()
                            cancel_queued()
                        continue
                    more = on_finish(key, future.result())
                    if failure is None:
                        submit(more)
        except BaseException:  # here, in this process (Ctrl-C, a full disk): leave no queued run behind
            cancel_queued()
            raise
        if failure is not None:
            raise failure


def _worker_pool(processes: int) -> concurrent.futures.ProcessPoolExecutor:
    """``processes`` spawned workers, each ending with this process (:func:`_exit_with_parent`)."""
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_exit_with_parent,
        initargs=(os.getpid(),),
    )


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
    records: list[dict[str, Any] | None] = [None] * len(configs)

    def finished(index: int, record: dict[str, Any] | None) -> list[Job]:
        records[index] = record
        if record is not None and on_result is not None:
            on_result(index, record)
        return []

    work = [(i, cfg, kwargs) for i, (cfg, kwargs) in enumerate(zip(configs, per_run, strict=True))]
    _run_jobs(work, device, jobs, _deadline_at(deadline), finished)
    return records


def _deadline_at(deadline: float | None) -> float | None:
    """The wall-clock time ``deadline`` seconds from now (None: no deadline)."""
    return None if deadline is None else time.time() + deadline


@dataclass
class GridResult:
    """One cell of a suite run over a learning-rate grid (see :func:`run_lr_grid`)."""

    lr: float
    """The grid's lr with the lowest final training loss on the first seed."""
    seeds: list[dict[str, Any] | None]
    """The records at that lr, one per seed (the first seed's from the grid); None: not run (deadline)."""
    grid: list[dict[str, Any] | None]
    """The first seed's records at every lr of the grid, in grid order."""


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

    The selection reads no held-out data. Every cell's grid runs are queued first, in cell order; a
    cell's further seeds are queued as soon as its own grid has finished, so they start while other
    cells' grids still run (no process waits for the slowest grid run of the whole suite). The
    records do not depend on that order: each run is seeded and runs alone in its process.
    ``on_result(cell index, record)`` is called as each run finishes. ``deadline``: seconds from now
    after which no run starts (its record is None; a cell whose grid did not finish runs no further
    seeds). ``known(cell index, config)``: a record saved by an earlier, interrupted call for that
    exact run, or None; known runs are not run again (nor passed to ``on_result``), so a suite resumes
    where it stopped and makes the same lr choices.
    """
    if not lrs or not seeds:
        raise ValueError("run_lr_grid needs at least one lr and one seed")
    plan = _GridPlan(cells, lrs, seeds, known)

    def finished(key: GridKey, record: dict[str, Any] | None) -> list[Job]:
        if record is not None and on_result is not None:
            on_result(key[0], record)
        return plan.file(key, record)

    _run_jobs(plan.todo(plan.first_jobs()), device, jobs, _deadline_at(deadline), finished)
    return plan.results()


GridKey = tuple[int, str, int]
"""A run of :func:`run_lr_grid`: ``(cell index, "grid" or "seed", index in the lr grid or the
further seeds)``."""


class _GridPlan:
    """:func:`run_lr_grid`'s records as they come in, and the runs each one makes due."""

    def __init__(
        self,
        cells: Sequence[tuple[RunConfig, dict[str, Any]]],
        lrs: Sequence[float],
        seeds: Sequence[int],
        known: Callable[[int, RunConfig], dict[str, Any] | None] | None,
    ) -> None:
        self.cells, self.lrs, self.seeds, self.known = cells, lrs, seeds, known
        self.grids: list[list[dict[str, Any] | None]] = [[None] * len(lrs) for _ in cells]
        self.grid_left = [len(lrs)] * len(cells)
        self.chosen: list[int | None] = [None] * len(cells)
        self.more: list[list[dict[str, Any] | None]] = [[None] * (len(seeds) - 1) for _ in cells]

    def first_jobs(self) -> list[Job]:
        """Every cell's grid: each lr on the first seed, in cell order."""
        return [
            ((i, "grid", k), replace(cfg, lr=lr, seed=self.seeds[0]), data_kwargs)
            for i, (cfg, data_kwargs) in enumerate(self.cells)
            for k, lr in enumerate(self.lrs)
        ]

    def todo(self, jobs: list[Job]) -> list[Job]:
        """The jobs ``known`` does not hold; the known ones are filed as finished, without a report."""
        left = []
        for job in jobs:
            record = None if self.known is None else self.known(job[0][0], job[1])
            left += [job] if record is None else self.file(job[0], record)
        return left

    def file(self, key: GridKey, record: dict[str, Any] | None) -> list[Job]:
        """File a finished run (None: not started); for a cell's last grid run, the jobs of its
        further seeds at the lr with the lowest final training loss."""
        i, kind, k = key
        if kind == "seed":
            self.more[i][k] = record
            return []
        grid = self.grids[i]
        grid[k] = record
        self.grid_left[i] -= 1
        if self.grid_left[i] or any(r is None for r in grid):
            return []
        best = self.chosen[i] = grid.index(best_by_loss(grid))  # type: ignore[arg-type]
        cfg, data_kwargs = self.cells[i]
        further = enumerate(self.seeds[1:])
        return self.todo(
            [((i, "seed", k), replace(cfg, lr=self.lrs[best], seed=seed), data_kwargs) for k, seed in further]
        )

    def results(self) -> list[GridResult]:
        out = []
        for grid, best, more in zip(self.grids, self.chosen, self.more, strict=True):
            if best is None:
                out.append(GridResult(float("nan"), [None] * len(self.seeds), grid))
            else:
                out.append(GridResult(self.lrs[best], [grid[best], *more], grid))
        return out
