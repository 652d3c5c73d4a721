"""``reproduce.py depth | defaults | deep | bounds``: what ``--append`` plans again, what ``--replace``
puts in place, the warm-up the paper-chain suites give deep twins and how their table shows a diverged run."""

import json
import sys
from pathlib import Path

import pytest

from timm_ortho.train import many_runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import depth_suite
import reproduce


def _run(regime: str, seed: int, depth: int = 20, tag: str = "saved") -> dict:
    return {"dataset": "digits", "regime": regime, "depth": depth, "seed": seed, "tag": tag}


def _call_depth(tmp_path, monkeypatch, regimes: list[str], flag: str, runs=([], [])) -> tuple[list, dict]:
    """``reproduce.py depth`` on ``regimes`` at 20 layers, two seeds, with ``flag``; the training is
    replaced by ``runs`` (results, grid). Returns the cells it planned and what it wrote."""
    planned, written = [], {}

    def run_suite(cells, *args, **kwargs):
        planned.extend((c[0], c[1], c[2]) for c in cells)
        return runs

    def write(results, budget, out, name, grid=None):
        written.update(results=results, grid=grid, budget=budget)
        return []

    monkeypatch.setattr(depth_suite, "run_suite", run_suite)
    monkeypatch.setattr(depth_suite, "write", write)
    argv = ["depth", "--depths", "20", "--datasets", "digits", "--regimes", *regimes]
    argv += ["--seeds", "0", "1", "--jobs", "1", "--device", "cpu", flag, "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["reproduce.py", *argv])  # what the record logs as the command
    reproduce.run_depth(reproduce.build_parser().parse_args(argv))
    return planned, written


def test_append_plans_again_a_cell_a_deadline_cut_short_and_keeps_the_complete_ones(tmp_path, monkeypatch):
    complete, cut = depth_suite.CORE[0], depth_suite.CORE[1]
    saved = {"results": [_run(complete, 0), _run(complete, 1), _run(cut, 0)]}
    saved["grid"] = [_run(complete, 0), _run(cut, 0)]
    (tmp_path / "depth.json").write_text(json.dumps(saved))
    planned, written = _call_depth(tmp_path, monkeypatch, [complete, cut], "--append")
    assert planned == [("digits", cut, 20)]  # the cut cell again, whole; the complete one not
    assert written["results"] == [_run(complete, 0), _run(complete, 1)]
    assert written["grid"] == [_run(complete, 0)]


def test_append_keeps_the_runs_of_cells_it_does_not_plan_whatever_their_seeds(tmp_path, monkeypatch):
    # A one-seed cell of an earlier call (a size of the deep grid) and a two-seed one: appending a new
    # regime with two seeds plans the new regime only and writes back every saved run.
    one_seed, two_seeds, new = depth_suite.CORE[:3]
    saved = {"results": [_run(one_seed, 0), _run(two_seeds, 0), _run(two_seeds, 1)]}
    saved["grid"] = [_run(two_seeds, 0)]
    rerun_log = [{"cells": [["digits", two_seeds, 20]], "command": "depth --replace"}]
    saved["budget"] = {"seeds": [0], "reruns": rerun_log, "where": "a note of the first call"}
    (tmp_path / "depth.json").write_text(json.dumps(saved))
    fresh = ([_run(new, 0, tag="new"), _run(new, 1, tag="new")], [_run(new, 0, tag="new")])
    planned, written = _call_depth(tmp_path, monkeypatch, [new], "--append", fresh)
    assert planned == [("digits", new, 20)]
    assert written["results"] == [*saved["results"], *fresh[0]]
    assert written["grid"] == [*saved["grid"], *fresh[1]]
    # The record's logs survive the call, which is logged beside them; its settings are this call's.
    budget = written["budget"]
    assert budget["reruns"] == rerun_log and budget["where"] == "a note of the first call"
    assert budget["seeds"] == [0, 1]
    assert [call["cells"] for call in budget["appends"]] == [[("digits", new, 20)]]
    assert "--append" in budget["appends"][0]["command"]


def test_replace_cells_puts_a_rerun_cell_whole_in_its_old_place_and_a_new_one_last():
    a, b, c = depth_suite.CORE[:3]
    saved = {
        "results": [_run(a, 0), _run(a, 1), _run(b, 0), _run(b, 1), _run(c, 0)],
        "grid": [_run(a, 0), _run(b, 0), _run(b, 0), _run(c, 0)],
    }
    # The rerun of b has one grid run (the saved cell had two) and a cell at 44 layers the record lacks.
    fresh = {
        "results": [_run(b, 0, tag="new"), _run(b, 1, tag="new"), _run(a, 0, 44, "new")],
        "grid": [_run(b, 0, tag="new"), _run(a, 0, 44, "new")],
    }
    merged = reproduce.replace_cells(saved, fresh, reproduce._depth_key)
    assert merged["results"] == [
        _run(a, 0),
        _run(a, 1),
        _run(b, 0, tag="new"),
        _run(b, 1, tag="new"),
        _run(c, 0),
        _run(a, 0, 44, "new"),
    ]
    # b's two saved grid runs are gone: no cell keeps runs of the code it was rerun to replace.
    assert merged["grid"] == [_run(a, 0), _run(b, 0, tag="new"), _run(c, 0), _run(a, 0, 44, "new")]


def test_replace_reruns_planned_cells_into_the_saved_json_and_keeps_a_cell_cut_short(tmp_path, monkeypatch):
    whole, cut, other = depth_suite.CORE[:3]
    saved = {
        "budget": {"steps": 300},
        "results": [_run(regime, seed) for regime in (whole, cut, other) for seed in (0, 1)],
        "grid": [_run(whole, 0), _run(cut, 0), _run(other, 0)],
    }
    (tmp_path / "depth.json").write_text(json.dumps(saved))
    # A deadline let the second cell run one seed of two.
    results = [_run(whole, 0, tag="new"), _run(whole, 1, tag="new"), _run(cut, 0, tag="new")]
    runs = results, [_run(whole, 0, tag="new"), _run(cut, 0, tag="new")]
    planned, written = _call_depth(tmp_path, monkeypatch, [whole, cut], "--replace", runs)
    assert planned == [("digits", whole, 20), ("digits", cut, 20)]
    assert written["results"] == [
        _run(whole, 0, tag="new"),
        _run(whole, 1, tag="new"),
        *saved["results"][2:],
    ]
    assert written["grid"] == [_run(whole, 0, tag="new"), *saved["grid"][1:]]
    (rerun,) = written["budget"]["reruns"]
    assert rerun["cells"] == [("digits", whole, 20)]
    assert rerun["code"].startswith("timm_ortho") and written["budget"]["steps"] == 300


def test_replace_refuses_append_and_a_missing_record(tmp_path):
    base = ["depth", "--depths", "20", "--datasets", "digits", "--out", str(tmp_path), "--replace"]
    with pytest.raises(SystemExit, match="exclude each other"):
        reproduce.run_depth(reproduce.build_parser().parse_args([*base, "--append"]))
    with pytest.raises(SystemExit, match="run the suite without it first"):
        reproduce.run_depth(reproduce.build_parser().parse_args(base))


def test_depth_suites_refuse_the_regularizer_suites_data_set_with_one_line(tmp_path):
    args = reproduce.build_parser().parse_args(["bounds", "--datasets", "hard", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"bounds runs on \['digits', 'synthetic'\], not \['hard'\]"):
        reproduce.run_depth(args)


@pytest.mark.parametrize("depth, warmed", [(44, False), (110, True)])
def test_paper_chain_suites_warm_up_the_residual_twin_from_56_layers(depth, warmed, monkeypatch):
    planned = []

    def run_job(cfg, *args):  # one run in this process (jobs=1), recorded instead of trained
        planned.append(cfg)
        return {"config": {"lr": cfg.lr}, "final": {"train_loss": 1.0, "diverged": False}}

    monkeypatch.setattr(many_runs, "_run_job", run_job)
    args = reproduce.build_parser().parse_args(["mechanism", "--seeds", "0", "1", "--lrs", "0.1"])
    args.steps, args.batch_size, args.data_kwargs, args.jobs = 10, 4, {}, 1
    reproduce.compare(depth, args, "test")
    twins = [cfg for cfg in planned if cfg.model.startswith("cifar_resnet")]
    assert twins and all(cfg.warmup is warmed for cfg in twins)
    assert not any(cfg.warmup for cfg in planned if cfg.model.startswith("plain_cnn"))


def test_deep_grid_runs_its_twin_entry_on_the_residual_net_without_the_warm_up():
    cells = depth_suite.plan_deep(10, 4, ["digits"])
    by_label = {label: cfg for _, label, _, cfg in cells}
    assert set(by_label) == set(depth_suite.DEEP_GRID)  # the grid's constants are not consumed
    twin = by_label["residual twin, MSRA + L2, no warm-up"]
    assert (twin.model, twin.method, twin.warmup) == ("cifar_resnet1202", "l2", False)
    plain = [cfg for label, cfg in by_label.items() if label != "residual twin, MSRA + L2, no warm-up"]
    assert all(cfg.model == "plain_cnn1202" and not cfg.warmup for cfg in plain)
    assert "family" in depth_suite.DEEP_GRID["residual twin, MSRA + L2, no warm-up"]


def test_paper_chain_table_names_diverged_seeds_instead_of_averaging_nan():
    nan = float("nan")

    def row(regime: str, diverged: list[bool], loss: list[float]) -> dict:
        values = dict(train_loss=loss, val_acc=[0.5] * 2, cosine=[0.1] * 2)
        values.update(ratio_before_drop=[1.0] * 2, ratio_end=[1.0] * 2)
        return dict(regime=regime, lr=0.03, diverged=diverged, **values)

    text = reproduce.table([row("all", [True, True], [nan, nan]), row("one", [False, True], [1.25, nan])])
    assert "| all | 0.03 | diverged (every seed) | - |" in text
    assert "| one | 0.03 | 1.250 (1 of 2 seeds diverged) | 0.500 |" in text
    assert "nan" not in text


def test_depth_table_names_a_diverged_seed_in_the_per_seed_column_and_scores_it_zero_in_the_mean():
    def entry(seed: int, diverged: bool, acc: float) -> dict:
        final = dict(val_acc=acc, val_acc_precise=acc, train_loss=0.5, diverged=diverged)
        record = dict(config=dict(lr=0.1, seed=seed), final=final, seconds=1.0)
        return dict(dataset="digits", regime="method, defaults", depth=20, record=record)

    rows = depth_suite.summarize([entry(0, False, 0.9), entry(1, True, 0.0), entry(2, False, 0.6)])
    assert rows[0]["diverged_seeds"] == [False, True, False]
    line = depth_suite.table(rows).splitlines()[-1]
    # the mean counts the diverged seed as 0: (0.9 + 0 + 0.6) / 3 = 0.5
    expected = "| digits | 20 | method, defaults | 0.1 | 0.500 ± 0.458 | 0.500 ± 0.458 "
    expected += "| 0.900 / NaN / 0.600 | 1 |"
    assert line == expected
    # a row summarized before the flags were kept reads as it did
    del rows[0]["diverged_seeds"]
    assert "| 0.900 / 0.000 / 0.600 | 1 |" in depth_suite.table(rows)
