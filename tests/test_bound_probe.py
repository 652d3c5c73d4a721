"""``scripts/bound_probe.py``: its observer records the step bound's factor per layer and leaves the
wrapper's step exactly as it is."""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bound_probe import BoundObserver

from timm_ortho import OrthoModulated


def _chain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )


def _step(model: nn.Module, ratio: float) -> OrthoModulated:
    opt = OrthoModulated(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        max_grad_ratio=ratio,
        modulation=False,
        ortho_decay=0.0,
    )  # no term: the gradient the bound sees is the loss's alone
    x, y = (
        torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(1)),
        torch.tensor([0, 1, 2, 3, 4, 0]),
    )
    nn.functional.cross_entropy(model(x), y).backward()
    return opt


def test_the_observer_records_each_layers_factor_and_changes_no_step():
    ratio = 1e-3  # small enough that every layer is bound
    plain, observed = _chain(), _chain()
    opt = _step(plain, ratio)
    opt.step()
    opt_seen = _step(observed, ratio)
    weights = [t.param for t in opt_seen.targets]
    grads = [w.grad.double() for w in weights]
    # The factor an independent float64 computation gives, from the gradients before the step.
    expected = torch.stack(
        [
            (ratio * w.detach().double().norm() / g.norm()).clamp(max=1.0)
            for w, g in zip(weights, grads, strict=True)
        ]
    )
    with BoundObserver() as seen:
        opt_seen.step()
    assert len(seen.factors) == 1
    torch.testing.assert_close(seen.factors[0].double(), expected, rtol=1e-5, atol=0)
    assert seen.summary() == (1.0, seen.factors[0].mean().item())
    for a, b in zip(plain.parameters(), observed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The wrapper's own method is back once the observer is left.
    assert OrthoModulated.bound_gradients is seen._original
