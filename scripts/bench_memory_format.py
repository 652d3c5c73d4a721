"""Channels-last against contiguous memory on the regularizer suite's models: what it would save.

    python scripts/bench_memory_format.py                       # every model and regime: about 5 min
    python scripts/bench_memory_format.py --models resnet18 --repeats 3
    python scripts/bench_memory_format.py --project /tmp/reg44/regularizer.json /tmp/reg110/regularizer.json

For each model and regime of ``reproduce.py regularizer`` (its digits cells), one training step as
the suite takes it (batch 32, SGD with momentum, the regime's regularizer, the step bound on the
bare optimizer where the suite sets one), on one thread, as a suite's worker process runs it. The
two formats are timed in alternation (``--repeats`` rounds of ``--steps`` steps each) and the
median per step is printed with the ratio channels-last / contiguous.

The two formats are not the same arithmetic (other oneDNN kernels: the weights part in the last
bits within a few steps), so adopting one for the suite means rerunning its record. ``--project``
reads suite JSONs written by ``reproduce.py regularizer`` on this machine (ideally idle) and
projects each call's time with channels-last: the runs' own seconds times their model and regime's
ratio, halved for the two processes, against the same sum without the ratio. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import convergence_suites as suites

from timm_ortho.step_bound import bound_gradients_
from timm_ortho.targets import find_targets
from timm_ortho.train.experiments import load_tensor_data
from timm_ortho.train.regimes import baseline_bound, regime_model, regime_optimizer


def suite_step(cell: suites.Cell, channels_last: bool) -> tuple[Callable[[], None], nn.Module]:
    """One step of ``cell``'s run (lr 0.02, seed 0) on a fixed batch of 32 training images, and the
    model it trains."""
    torch.manual_seed(0)
    data = load_tensor_data(**cell.data)
    cfg = dataclasses.replace(cell.cfg, lr=0.02)
    model = regime_model(cfg, data)
    x, y = data.x_train[:32], data.y_train[:32]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = regime_optimizer(cfg, model)
    bound = baseline_bound(cfg, model, find_targets(model))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if bound is not None:
            bound_gradients_(*bound)
        opt.step()

    return step, model


def measure(cell: suites.Cell, steps: int, repeats: int) -> tuple[float, float]:
    """Median seconds per step, (contiguous, channels-last), the formats timed in alternation."""
    runs = {False: suite_step(cell, False)[0], True: suite_step(cell, True)[0]}
    for run in runs.values():  # warm-up: oneDNN builds its primitives on the first calls
        for _ in range(3):
            run()
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for channels_last, run in runs.items():
            start = time.perf_counter()
            for _ in range(steps):
                run()
            times[channels_last].append((time.perf_counter() - start) / steps)
    return statistics.median(times[False]), statistics.median(times[True])


def project(paths: list[Path], ratios: dict[tuple[str, str], float]) -> None:
    """Each suite JSON's runs' seconds, summed and halved, as run and scaled by the measured ratios."""
    print("\nprojection (the runs' own seconds / 2 processes; wall time adds model builds and evaluations)")
    for path in paths:
        record = json.loads(path.read_text())
        runs = {}
        for e in record["results"] + record.get("grid", []):  # the grid repeats the first seed's runs
            key = suites.run_key(e["dataset"], e["model"], e["regime"], e["budget"], e["record"]["config"])
            runs[key] = (e["model"], e["regime"], e["record"]["seconds"])
        missing = {(m, r) for m, r, _ in runs.values()} - set(ratios)
        if missing:
            print(f"  {path}: not measured here: {sorted(missing)}; pass those models with --models")
            continue
        now = sum(s for _, _, s in runs.values()) / 2
        then = sum(s * ratios[(m, r)] for m, r, s in runs.values()) / 2
        wall = record["budget"].get("seconds")
        print(
            f"  {path}: {len(runs)} runs, wall {wall} s; runs' seconds / 2: {now / 60:.1f} min contiguous, "
            f"{then / 60:.1f} min channels-last ({then / now:.3f})"
        )


def _is_suite_json(path: Path) -> bool:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and isinstance(record.get("results"), list) and "budget" in record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(suites.REGULARIZER_MODELS), help="row labels")
    parser.add_argument("--steps", type=int, default=6, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per format")
    parser.add_argument("--project", nargs="+", type=Path, default=[], help="suite JSONs to project")
    args = parser.parse_args()
    unknown = set(args.models) - set(suites.REGULARIZER_MODELS)
    if unknown:
        parser.error(
            f"unknown model label(s) {sorted(unknown)}; choose from {list(suites.REGULARIZER_MODELS)}"
        )
    for path in args.project:  # checked before minutes of timing, not after
        if not path.is_file() or not _is_suite_json(path):
            parser.error(f"--project {path}: not a JSON written by `reproduce.py regularizer` (--out)")
    torch.set_num_threads(1)  # a suite worker's share of a 2-core CPU
    ratios: dict[tuple[str, str], float] = {}
    print(f"{'model':24s} {'regime':26s} {'contiguous':>11s} {'channels-last':>14s} {'ratio':>6s}")
    for cell in suites.plan_regularizer(["digits"]):
        if cell.model not in args.models:
            continue
        contiguous, channels_last = measure(cell, args.steps, args.repeats)
        ratios[(cell.model, cell.regime)] = channels_last / contiguous
        print(
            f"{cell.model:24s} {cell.regime:26s} {contiguous * 1e3:8.1f} ms {channels_last * 1e3:11.1f} ms "
            f"{channels_last / contiguous:6.3f}",
            flush=True,
        )
    if args.project:
        project(args.project, ratios)


if __name__ == "__main__":
    main()
