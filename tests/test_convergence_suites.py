"""``reproduce.py models | regularizer | hardness``: the plans, and a suite resumed from its partial file."""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import convergence_suites as suites

TINY = {"img_size": 8, "n_train": 64, "n_val": 32}


def _tiny(cells):
    return [
        dataclasses.replace(c, cfg=dataclasses.replace(c.cfg, steps=3, record_every=3), data=TINY)
        for c in cells
    ]


def test_the_regularizer_plan_has_every_regime_and_modulation_on_chains_only():
    cells = suites.plan_regularizer(["digits", "hard"])
    labels = {(c.model, c.regime) for c in cells}
    assert len(labels) == 3 * 2 * 4 + 3 * 3 + 3  # plain rows: 4 regimes; residual rows: no modulation
    assert all(c.cfg.steps == suites.CONVERGED_STEPS and c.lrs == suites.SGD_LRS for c in cells)
    twins = [c for c in cells if c.model == "cifar_resnet110"]
    assert twins and all(c.cfg.warmup for c in twins)  # He et al.'s warm-up from 56 layers
    assert not any(c.cfg.warmup for c in cells if c.model.startswith("plain_cnn"))


def test_the_regularizer_and_hardness_suites_keep_the_bound_they_were_recorded_with():
    # min(0.01, 1/L) on plain chains (the wrapper's "auto" when recorded; "auto" is 1/L now), none elsewhere.
    from timm_ortho.defaults import max_grad_ratio_for

    bounds = {c.model: c.cfg.max_grad_ratio for c in suites.plan_regularizer(["digits"])}
    assert bounds["plain_cnn20 (ReLU)"] == bounds["plain_cnn44 (shaped)"] == 0.01
    assert bounds["plain_cnn110 (shaped)"] == max_grad_ratio_for(110) == 1 / 110  # the rules agree here
    assert max_grad_ratio_for(20) == 1 / 20  # and differ here
    assert bounds["cifar_resnet20"] is bounds["resnet18"] is None
    assert {c.cfg.max_grad_ratio for c in suites.plan_hardness()} == {0.01, None}


def test_the_regularizer_plan_at_the_longer_budget_keeps_its_own_label():
    cells = suites.plan_regularizer(["hard"], ["converged", "4,000 steps"])
    by_budget = {b: [c for c in cells if c.budget == b] for b in ("converged", "4,000 steps")}
    assert len(by_budget["converged"]) == len(by_budget["4,000 steps"]) == len(cells) // 2
    assert {c.cfg.steps for c in by_budget["4,000 steps"]} == {suites.LONG_STEPS}
    assert {c.cfg.record_every for c in by_budget["4,000 steps"]} == {suites.LONG_STEPS // 20}
    # The same cell at two budgets is two cells: --append keeps the converged runs beside the longer ones.
    import reproduce

    assert len({reproduce.cell_key(vars(c)) for c in cells}) == len(cells)
    args = reproduce.build_parser().parse_args(["regularizer", "--budgets", "4,000 steps"])
    assert args.budgets == ["4,000 steps"]


def test_a_suite_resumed_from_its_saved_runs_runs_only_the_missing_ones():
    cells = _tiny(suites.plan_hardness()[:2])
    cells = [dataclasses.replace(c, lrs=(0.05, 0.01)) for c in cells]
    done: list = []
    results, grid = suites.run_cells(cells, [0, 1], "cpu", 1, None, done.append)
    assert len(done) == len(cells) * 3  # two lrs on seed 0, then seed 1 at the chosen one

    # Cut short after the grid: the saved runs are the seed-0 ones.
    saved = [e for e in done if e["record"]["config"]["seed"] == 0]
    again: list = []
    resumed, resumed_grid = suites.run_cells(cells, [0, 1], "cpu", 1, None, again.append, saved)
    assert [e["record"]["config"]["seed"] for e in again] == [1, 1]
    assert [e["record"]["config"]["lr"] for e in resumed] == [e["record"]["config"]["lr"] for e in results]
    assert [e["record"]["final"] for e in resumed] == [e["record"]["final"] for e in results]
    assert resumed_grid == grid


def test_model_and_regime_rows_are_selected_by_label_and_an_unknown_label_is_named(capsys):
    import pytest
    import reproduce

    cells = suites.plan_models(["digits"], ["300 steps"])
    picked = reproduce.select(cells, "model", ["resnet18", "plain-110 row"], "--models")
    assert {c.model for c in picked} == {"resnet18", "plain-110 row"}
    assert reproduce.select(cells, "regime", None, "--regimes") == cells
    with pytest.raises(SystemExit, match=r"--models: no planned run is labelled \['resnet81'\]"):
        reproduce.select(cells, "model", ["resnet81"], "--models")


def test_a_suite_cut_by_its_deadline_keeps_its_runs_and_append_resume_completes_it(tmp_path, capsys):
    import json

    import reproduce

    def call(*extra: str) -> None:
        argv = ["regularizer", "--models", "cifar_resnet20", "--regimes", "none (MSRA init)"]
        argv += ["--datasets", "digits", "--steps", "2", "--seeds", "0", "1", "--lrs", "0.05", "0.01"]
        argv += ["--jobs", "1", "--device", "cpu", "--out", str(tmp_path), *extra]
        reproduce.run_convergence(reproduce.build_parser().parse_args(argv))

    call("--deadline", "0")  # no run may start: the one cell is cut
    assert "did not finish" in capsys.readouterr().out
    assert (tmp_path / "regularizer.partial.json").exists()
    assert json.loads((tmp_path / "regularizer.json").read_text())["results"] == []

    call("--append", "--resume")
    record = json.loads((tmp_path / "regularizer.json").read_text())
    assert sorted(e["record"]["config"]["seed"] for e in record["results"]) == [0, 1]
    assert len(record["grid"]) == 2  # both lrs on seed 0
    assert not (tmp_path / "regularizer.partial.json").exists()

    call("--append")  # complete now: nothing is planned again
    assert "0 cells, 0 runs" in capsys.readouterr().out


def test_replace_puts_a_rerun_cell_in_place_of_its_saved_runs_and_keeps_the_others(tmp_path):
    import json

    import reproduce

    def call(regimes: list[str], lrs: list[str], *extra: str) -> dict:
        argv = ["regularizer", "--models", "cifar_resnet20", "--regimes", *regimes, "--datasets", "digits"]
        argv += ["--steps", "2", "--seeds", "0", "1", "--lrs", *lrs, "--jobs", "1", "--device", "cpu"]
        reproduce.run_convergence(
            reproduce.build_parser().parse_args([*argv, "--out", str(tmp_path), *extra])
        )
        return json.loads((tmp_path / "regularizer.json").read_text())

    none, l2 = "none (MSRA init)", "L2 (MSRA init)"
    saved = call([none, l2], ["0.05"])
    rerun = call([none], ["0.01"], "--replace")  # another lr tells the rerun's runs from the saved ones

    def lrs(record: dict, regime: str) -> list[float]:
        return [e["record"]["config"]["lr"] for e in record["results"] if e["regime"] == regime]

    assert [e["regime"] for e in rerun["results"]] == [e["regime"] for e in saved["results"]]
    assert lrs(rerun, none) == [0.01, 0.01] and lrs(saved, none) == [0.05, 0.05]
    assert [e for e in rerun["results"] if e["regime"] == l2] == [
        e for e in saved["results"] if e["regime"] == l2
    ]
    assert [e["record"]["config"]["lr"] for e in rerun["grid"] if e["regime"] == none] == [0.01]
    (logged,) = rerun["budget"]["reruns"]
    assert logged["cells"] == [["digits", "cifar_resnet20", none, "converged"]]
    assert logged["code"].startswith("timm_ortho")


def test_comparisons_give_each_regime_against_its_rows_baseline_with_the_spread():
    def row(model, regime, acc, gap=(0.0, 0.0), cos=(0.1, 0.1)):
        return dict(
            dataset="digits",
            budget="converged",
            model=model,
            regime=regime,
            test_acc=list(acc),
            gap=list(gap),
            cosine=list(cos),
        )

    rows = [
        row("net", "L2 (MSRA init)", (0.90, 0.92)),  # mean 0.91, sd 0.01414
        row("net", "ortho (orthonormal init)", (0.95, 0.95), gap=(0.1, 0.3), cos=(0.01, 0.03)),
        row("net", "none (MSRA init)", (0.915, 0.915)),
        row("alone", "none (MSRA init)", (0.5, 0.5)),  # no baseline in its row: not compared
    ]
    lines = suites.comparisons(rows, suites.BASELINES["regularizer"]).splitlines()[2:]
    assert len(lines) == 2
    assert "| +0.040 | yes (sd 0.014) | +0.200 | 0.0200 vs 0.1000 |" in lines[0]
    assert "| +0.005 | no (sd 0.014) |" in lines[1]


def test_the_saved_json_leaves_out_per_layer_records_and_rounds_to_six_digits():
    final = {"train_loss": 0.123456789, "layer_names": ["a"], "layer_moments": [1.0], "layer_scales": [1.0]}
    entry = {
        "model": "m",
        "record": {"config": {"lr": 0.1}, "history": [{"loss": 2.0 / 3.0}], "final": final},
    }
    (kept,) = suites._without_layers([entry])
    assert kept["record"]["final"] == {"train_loss": 0.123456789}
    assert set(entry["record"]["final"]) == {"train_loss", *suites.PER_LAYER}  # the run itself untouched
    rounded = suites._significant(kept)
    assert rounded["record"]["final"]["train_loss"] == 0.123457
    assert rounded["record"]["history"][0]["loss"] == 0.666667
    assert rounded["record"]["config"] == {"lr": 0.1} and rounded["model"] == "m"
