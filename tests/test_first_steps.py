"""``scripts/first_steps.py``: the one-batch check of the step bound's first steps."""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import first_steps


def test_each_regime_records_a_finite_loss_per_step_and_one_after_the_last():
    for regime in first_steps.REGIMES:
        curve = first_steps.losses("plain_cnn20", regime, seed=0, steps=2, lr=0.1)
        assert len(curve) == 3 and all(math.isfinite(v) for v in curve)


def test_the_former_rule_differs_from_the_default_only_under_100_layers():
    # min(0.01, 1/L) = 1/L from 100 layers on: the same run, bit for bit; at 20 layers 0.01 < 1/20.
    former, default = "former bound min(0.01, 1/L)", "defaults"
    assert first_steps.losses("plain_cnn110", former, 0, 1, 0.1) == first_steps.losses(
        "plain_cnn110", default, 0, 1, 0.1
    )
    assert first_steps.losses("plain_cnn20", former, 0, 2, 0.1) != first_steps.losses(
        "plain_cnn20", default, 0, 2, 0.1
    )
