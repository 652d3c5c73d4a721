"""The first steps of a plain chain under the step bound: can it overfit one fixed batch?

The sanity check users run first on a new model: a few steps of SGD (lr 0.1, momentum 0.9) on one
batch of random images with random labels, where the loss should fall towards 0. For each model and
seed it reports the loss after ``--steps`` steps under

- *SGD + weight decay*: the bare optimizer with weight decay 1e-4 (the model's usual recipe);
- *defaults*: ``OrthoModulated(SGD(...), model)`` with nothing else (the step bound ``1/L`` on a
  plain chain of ``L`` target layers);
- *former bound*: the same with the rule the default replaced, ``min(0.01, 1/L)``, which held every
  chain under 100 layers to 0.01.

    python scripts/first_steps.py                         # plain_cnn20/44/110, 3 seeds: about 3 min
    python scripts/first_steps.py --models plain_cnn20 --steps 30 --out /tmp/first_steps.json

Single process, single thread; 32 images of 32 px, 10 classes. The table prints the mean ± sd over
the seeds; ``--out`` writes every run's loss curve as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from convergence_suites import recorded_bound
from tqdm import tqdm

import timm_ortho

# name -> (model, its timm name, lr) -> optimizer
REGIMES: dict[str, Callable[[torch.nn.Module, str, float], torch.optim.Optimizer]] = {
    "SGD + weight decay": lambda model, name, lr: torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4
    ),
    "defaults": lambda model, name, lr: timm_ortho.OrthoModulated(
        torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), model
    ),
    "former bound min(0.01, 1/L)": lambda model, name, lr: timm_ortho.OrthoModulated(
        torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), model, max_grad_ratio=recorded_bound(name)
    ),
}


def losses(model_name: str, regime: str, seed: int, steps: int, lr: float) -> list[float]:
    """The loss at every step of one run (before that step's update), and after the last."""
    torch.manual_seed(seed)
    model = timm.create_model(model_name, num_classes=10)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    opt = REGIMES[regime](model, model_name, lr)
    curve = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        curve.append(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        curve.append(F.cross_entropy(model(x), y))
    return [float(v) for v in curve]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["plain_cnn20", "plain_cnn44", "plain_cnn110"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", type=Path, help="write every run's loss curve here (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("timm_ortho").setLevel(logging.WARNING)  # an INFO line per wrapper; the bar says enough

    runs = [(m, r, s) for m in args.models for r in REGIMES for s in args.seeds]
    curves = {run: losses(*run, args.steps, args.lr) for run in tqdm(runs, desc="first steps", unit="run")}

    print(
        f"\nloss on one fixed batch after {args.steps} steps, lr {args.lr}, mean ± sd over seeds {args.seeds}"
    )
    print("| model | " + " | ".join(REGIMES) + " |")
    print("| --- |" + " --- |" * len(REGIMES))
    for model in args.models:
        cells = []
        for regime in REGIMES:
            final = [curves[(model, regime, s)][-1] for s in args.seeds]
            spread = statistics.stdev(final) if len(final) > 1 else 0.0
            cells.append(f"{statistics.mean(final):.3f} ± {spread:.3f}")
        print(f"| {model} | " + " | ".join(cells) + " |")
    if args.out:
        payload = {
            "budget": dict(steps=args.steps, lr=args.lr, seeds=args.seeds, batch=32, img_size=32, classes=10),
            "runs": [dict(model=m, regime=r, seed=s, loss=curves[(m, r, s)]) for m, r, s in runs],
        }
        args.out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
