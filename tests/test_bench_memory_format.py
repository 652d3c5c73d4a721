"""``scripts/bench_memory_format.py``: the suite's step in both memory formats, and its projection."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_memory_format as bench
import convergence_suites as suites


def _cell(model: str, regime: str) -> suites.Cell:
    (cell,) = [c for c in suites.plan_regularizer(["digits"]) if c.model == model and c.regime == regime]
    return cell


@pytest.mark.parametrize("regime", ["L2 (MSRA init)", "ortho + modulation"])
def test_both_formats_take_the_same_step_up_to_rounding(regime):
    # The same model, batch and optimizer in either layout: after one step the weights agree to
    # float32 rounding (the kernels differ, so not bit for bit), and every weight moved.
    cell = _cell("plain_cnn20 (ReLU)", regime)
    weights = {}
    for channels_last in (False, True):
        step, model = bench.suite_step(cell, channels_last)
        before = [p.detach().clone() for p in model.parameters()]
        step()
        after = [p.detach().clone() for p in model.parameters()]
        assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True) if a.dim() == 4)
        weights[channels_last] = after
    for a, b in zip(weights[False], weights[True], strict=True):
        torch.testing.assert_close(a.contiguous(), b.contiguous(), rtol=1e-4, atol=1e-5)


def test_the_projection_scales_each_run_by_its_model_and_regime(tmp_path, capsys):
    def entry(model, regime, seed, seconds):
        config = {"seed": seed, "lr": 0.1}
        record = {"config": config, "seconds": seconds}
        return dict(dataset="digits", model=model, regime=regime, budget="converged", record=record)

    runs = [entry("a", "L2", 0, 100.0), entry("a", "L2", 1, 100.0), entry("b", "none", 0, 60.0)]
    # the grid repeats the first seed's run: counted once
    path = tmp_path / "regularizer.json"
    path.write_text(json.dumps({"budget": {"seconds": 140}, "results": runs, "grid": runs[:1]}))
    bench.project([path], {("a", "L2"): 0.5, ("b", "none"): 1.0})
    out = capsys.readouterr().out
    assert "3 runs, wall 140 s" in out
    assert f"{260 / 2 / 60:.1f} min contiguous, {(100 + 60) / 2 / 60:.1f} min channels-last" in out
    bench.project([path], {("a", "L2"): 0.5})
    assert "not measured here: [('b', 'none')]" in capsys.readouterr().out


@pytest.mark.parametrize("content", [None, "not json", '{"a": 1}'])
def test_a_file_that_is_not_a_suite_json_is_refused_before_any_timing(content, tmp_path, monkeypatch, capsys):
    path = tmp_path / "regularizer.json"
    if content is not None:
        path.write_text(content)
    timed = []
    monkeypatch.setattr(bench, "measure", lambda *args: timed.append(args))
    monkeypatch.setattr(sys, "argv", ["bench_memory_format.py", "--project", str(path)])
    with pytest.raises(SystemExit):
        bench.main()
    assert "not a JSON written by `reproduce.py regularizer`" in capsys.readouterr().err
    assert timed == []
