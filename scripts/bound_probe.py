"""How often the step bound binds on ``plain_cnn110``, by batch size: the models suite's plain-110 row
(batch 32) trails its twin at 300 steps where the depth suite's (batch 64) does not.

For each batch size and seed, one run of the suite's protocol (digits, cosine schedule, the defaults
of ``OrthoModulated``) at one lr, with the wrapper's bound observed: per step, the share of the
``L`` target layers whose gradient it scales down, and the mean factor ``min(1, ratio ||W|| / ||g||)``
over the layers (1 = the bound never binds; the product with the lr is the effective step size).

    python scripts/bound_probe.py                            # batch 32 and 64, lr 0.02, seeds 0-2: ~3 min
    python scripts/bound_probe.py --batches 32 --ratios 0.0091 0.02 0.05
    python scripts/bound_probe.py --bound-momentum 0.9       # the bound on the gradients' running average

Single process, single thread; the observation reads each step's norms on the host, so its runs are
for this probe only (the suites never observe the bound).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convergence_suites as suites

from timm_ortho import OrthoModulated
from timm_ortho.train.experiments import run
from timm_ortho.train.tensor_data import load_tensor_data


class BoundObserver:
    """Replaces ``OrthoModulated.bound_gradients`` while active: it bounds as the wrapper does and
    records each target layer's factor as the ratio of its gradient's norm after to before (exactly
    1 where the bound leaves a gradient as it is, whatever the bound measures: this step's gradient or,
    with ``bound_momentum``, the running average)."""

    def __init__(self) -> None:
        self.factors: list[torch.Tensor] = []  # one (L,) tensor per step
        self._original = OrthoModulated.bound_gradients

    def __enter__(self) -> BoundObserver:
        original, factors = self._original, self.factors

        @torch.no_grad()
        def observed(opt: OrthoModulated) -> None:
            selected, _ = opt._selected(lambda g: g["max_grad_ratio"])
            grads = [opt.targets[i].param.grad for i in selected]
            before = torch.stack(torch._foreach_norm(grads)) if selected else None
            original(opt)
            if selected:
                after = torch.stack(torch._foreach_norm(grads))
                factors.append(torch.where(before > 0, after / before, torch.ones_like(before)).cpu())

        OrthoModulated.bound_gradients = observed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        OrthoModulated.bound_gradients = self._original  # type: ignore[method-assign]

    def summary(self, steps: slice = slice(None)) -> tuple[float, float]:
        """(share of layer-steps bound, mean factor) over ``steps``."""
        f = torch.stack(self.factors[steps])
        return (f < 1).float().mean().item(), f.mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--ratios", type=float, nargs="+", default=[None], help="default: the wrapper's auto")
    parser.add_argument(
        "--bound-momentum", type=float, default=None, help="the bound on the gradients' running average"
    )
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=suites.SHORT_STEPS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_tensor_data(**suites.DATASETS["digits"])
    plan = [(b, r, s) for b in args.batches for r in args.ratios for s in args.seeds]
    rows = []
    for batch, ratio, seed in tqdm(plan, desc="bound probe", unit="run"):
        wrapper = {} if ratio is None else dict(max_grad_ratio=ratio)
        if args.bound_momentum is not None:
            wrapper["bound_momentum"] = args.bound_momentum
        cfg = suites.suite_config("plain_cnn110", args.steps, method="default", wrapper=wrapper)
        cfg = dataclasses.replace(cfg, batch_size=batch, lr=args.lr, seed=seed)
        with BoundObserver() as seen:
            record = run(cfg, data)
        final = record["final"]
        third = len(seen.factors) // 3
        rows.append(
            (
                batch,
                "auto" if ratio is None else ratio,
                seed,
                *seen.summary(slice(None, third)),
                *seen.summary(slice(2 * third, None)),
                final["train_loss"],
                final.get("val_acc_precise", final["val_acc"]),
            )
        )
    print(
        "| batch | bound | seed | bound share, first third | mean factor | bound share, last third | "
        "mean factor | train loss | test acc |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for r in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r) + " |")


if __name__ == "__main__":
    main()
