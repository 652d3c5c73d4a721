"""The measurement runner behind scripts/reproduce.py, on tiny budgets."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from timm_ortho.train import experiments
from timm_ortho.train.experiments import RunConfig, best_by_loss, load_tensor_data, run
from timm_ortho.train.many_runs import run_many


@pytest.fixture(scope="module")
def data():
    return load_tensor_data(img_size=8, n_train=64, n_val=32)


def test_synthetic_tensors_are_normalized_and_contiguous(data):
    assert data.x_train.shape == (64, 3, 8, 8) and data.x_train.is_contiguous()
    torch.testing.assert_close(data.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    assert "synthetic" in data.source and data.num_classes == 10


def test_cifar_tensors_from_the_release_format(tmp_path, write_cifar):
    write_cifar(tmp_path)
    loaded = load_tensor_data(tmp_path, img_size=8, n_train=10, n_val=4)
    assert loaded.x_train.shape == (10, 3, 8, 8) and loaded.y_val.shape == (4,)
    assert "CIFAR-10" in loaded.source


@pytest.mark.parametrize("method", ["l2", "ortho", "ortho_mod"])
def test_each_regime_records_the_mechanism_quantities(data, method):
    cfg = RunConfig(model="plain_cnn20", method=method, steps=4, batch_size=8, record_every=2)
    record = run(cfg, data)
    assert [h["step"] for h in record["history"]] == [2, 4]
    for h in record["history"]:
        assert math.isfinite(h["loss"]) and 0 <= h["cosine"] <= 1 and h["bottom_top_ratio"] > 0
    final = record["final"]
    assert len(final["layer_moments"]) == len(final["layer_names"]) == 19  # convs, classifier left out
    assert 0 <= final["val_acc"] <= 1 and not final["diverged"]
    if method != "ortho_mod":
        assert all(s == 1.0 for s in final["layer_scales"])


@pytest.mark.parametrize(("model", "method"), [("plain_cnn20", "l2"), ("cifar_resnet20", "ortho")])
def test_a_probe_on_record_steps_only_records_what_an_every_step_probe_does(data, monkeypatch, model, method):
    # The measure-only probe is hooked on the recorded steps only; it changes no error, so the
    # run's record (history, final per-layer moments, accuracies) is the every-step probe's, bit for bit.
    cfg = RunConfig(model=model, method=method, steps=7, batch_size=8, record_every=3, precise_bn=2)
    hooked_steps = []
    original = experiments._RecordStepProbe.record

    def spy(self, on):
        hooked_steps.append(on)
        original(self, on)

    monkeypatch.setattr(experiments._RecordStepProbe, "record", spy)
    gated = run(cfg, data)
    assert hooked_steps == [False, False, True, False, False, True, True]  # steps 3, 6 and the last
    monkeypatch.setattr(experiments._RecordStepProbe, "record", lambda self, on: original(self, True))
    every_step = run(cfg, data)
    gated.pop("seconds"), every_step.pop("seconds")
    assert gated == every_step


def test_a_record_names_the_code_it_comes_from(data):
    record = run(RunConfig(model="plain_cnn20", method="l2", steps=1, batch_size=8, record_every=1), data)
    assert record["code"] == experiments.code_version()
    assert record["code"].startswith("timm_ortho ")
    # From this checkout (tests run from one): the commit, and whether the code differs from it.
    assert ", commit " in record["code"]


def test_same_seed_same_result_and_best_by_loss(data):
    cfg = RunConfig(model="plain_cnn20", method="ortho", steps=3, batch_size=8, record_every=3)
    a, b = run(cfg, data), run(cfg, data)
    assert a["final"]["train_loss"] == b["final"]["train_loss"]
    serial = run_many([cfg], {"img_size": 8, "n_train": 64, "n_val": 32})
    assert serial[0]["final"]["train_loss"] == a["final"]["train_loss"]
    diverged = {**a, "final": {**a["final"], "diverged": True, "train_loss": float("nan")}}
    assert best_by_loss([diverged, a]) is a


def test_digits_split_is_fixed_normalized_and_disjoint():
    digits = load_tensor_data(dataset="digits", img_size=8, n_train=1500)
    assert digits.x_train.shape == (1500, 3, 8, 8) and digits.x_val.shape == (297, 3, 8, 8)
    assert digits.num_classes == 10 and "digits" in digits.source
    torch.testing.assert_close(digits.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    train_rows = {tuple(r.tolist()) for r in digits.x_train.flatten(1)}
    assert not any(tuple(r.tolist()) in train_rows for r in digits.x_val.flatten(1)[:50])
    again = load_tensor_data(dataset="digits", img_size=8, n_train=1500)
    assert torch.equal(again.y_val, digits.y_val)
    with pytest.raises(ValueError, match="data_dir"):
        load_tensor_data(dataset="cifar10")


def test_the_default_regime_is_the_users_call_and_precise_bn_is_reported(data):
    from timm_ortho.optim import DEFAULT_MAX_GRAD_RATIO

    cfg = RunConfig(
        model="plain_cnn20", method="default", steps=3, batch_size=8, record_every=3, precise_bn=2
    )
    record = run(cfg, data)
    final = record["final"]
    assert 0 <= final["val_acc_precise"] <= 1 and math.isfinite(final["val_loss_precise"])
    assert DEFAULT_MAX_GRAD_RATIO is not None  # the default recipe bounds the step
    ablated = RunConfig(**{**cfg.__dict__, "wrapper": {"max_grad_ratio": None}, "act_layer": "relu"})
    assert run(ablated, data)["final"]["train_loss"] != final["train_loss"]


def test_the_factory_builds_exactly_the_users_literal_call():
    """``"default"`` goes through create_optimizer (timm's "momentum"), yet steps bit for bit like
    ``OrthoModulated(torch.optim.SGD(model.parameters(), lr, momentum=0.9), model)``."""
    import timm

    from timm_ortho import OrthoModulated
    from timm_ortho.train.regimes import regime_optimizer

    def train(make):
        torch.manual_seed(0)
        model = timm.create_model("plain_cnn20", num_classes=3)
        opt = make(model)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return model, opt

    cfg = RunConfig(model="plain_cnn20", method="default", lr=0.1)
    factory, f_opt = train(lambda m: regime_optimizer(cfg, m))
    literal, l_opt = train(lambda m: OrthoModulated(torch.optim.SGD(m.parameters(), 0.1, momentum=0.9), m))
    assert isinstance(f_opt, OrthoModulated) and type(f_opt.base_optimizer) is torch.optim.SGD
    assert len(f_opt.param_groups) == len(l_opt.param_groups) == 1
    for (name, a), b in zip(factory.state_dict().items(), literal.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for p, q in zip(factory.parameters(), literal.parameters(), strict=True):
        assert torch.equal(f_opt.state[p]["momentum_buffer"], l_opt.state[q]["momentum_buffer"])


def test_run_many_takes_data_per_run_a_deadline_and_reports_each_result(data):
    cfg = RunConfig(model="plain_cnn20", method="l2", steps=2, batch_size=8, record_every=2)
    small = {"img_size": 8, "n_train": 64, "n_val": 32}
    other = {**small, "num_classes": 3}
    seen = []
    records = run_many([cfg, cfg], [small, other], on_result=lambda i, r: seen.append((i, r)))
    assert [i for i, _ in seen] == [0, 1] and [r for _, r in seen] == records
    assert records[0]["final"]["train_loss"] == run(cfg, data)["final"]["train_loss"]
    assert records[1]["final"]["train_loss"] != records[0]["final"]["train_loss"]  # 3 classes
    assert run_many([cfg], small, deadline=0.0) == [None]  # past the deadline: not started
    with pytest.raises(ValueError, match="2 data_kwargs for 1 configs"):
        run_many([cfg], [small, other])


def test_lr_grid_runs_every_lr_on_the_first_seed_then_the_best_on_the_others(data):
    from timm_ortho.train.many_runs import run_lr_grid

    cfg = RunConfig(model="plain_cnn20", method="l2", steps=3, batch_size=8, record_every=3)
    kwargs = {"img_size": 8, "n_train": 64, "n_val": 32}
    finished = []
    (cell,) = run_lr_grid([(cfg, kwargs)], [0.01, 1e-9], [5, 6], on_result=lambda i, r: finished.append(r))
    assert [r["config"]["lr"] for r in cell.grid] == [0.01, 1e-9]
    assert all(r["config"]["seed"] == 5 for r in cell.grid)
    best = min(cell.grid, key=lambda r: r["final"]["train_loss"])
    assert cell.lr == best["config"]["lr"]
    assert cell.seeds[0] is best and cell.seeds[1]["config"]["seed"] == 6
    assert cell.seeds[1]["config"]["lr"] == cell.lr and len(finished) == 3
    # Past the deadline no run starts, and a cell without its whole grid runs no further seed.
    (cut,) = run_lr_grid([(cfg, kwargs)], [0.01, 1e-9], [5, 6], deadline=0.0)
    assert math.isnan(cut.lr) and cut.grid == [None, None] and cut.seeds == [None, None]


def test_lr_grid_resumes_from_known_runs_without_running_them_again(data):
    from timm_ortho.train.many_runs import run_lr_grid

    cfg = RunConfig(model="plain_cnn20", method="l2", steps=3, batch_size=8, record_every=3)
    kwargs = {"img_size": 8, "n_train": 64, "n_val": 32}
    (full,) = run_lr_grid([(cfg, kwargs)], [0.01, 1e-9], [5, 6])
    saved = {(r["config"]["lr"], r["config"]["seed"]): r for r in full.grid + full.seeds}
    asked, finished = [], []

    def known(index, config):  # an interrupted suite that kept the grid but not the second seed
        asked.append((index, config.lr, config.seed))
        return saved[(config.lr, config.seed)] if config.seed == 5 else None

    (resumed,) = run_lr_grid(
        [(cfg, kwargs)], [0.01, 1e-9], [5, 6], known=known, on_result=lambda i, r: finished.append(r)
    )
    assert asked == [(0, 0.01, 5), (0, 1e-9, 5), (0, full.lr, 6)]
    assert resumed.lr == full.lr and resumed.grid == full.grid  # the same choice from the saved grid
    assert [r["config"]["seed"] for r in finished] == [6]  # only the missing run ran and was reported
    assert finished[0]["final"]["train_loss"] == full.seeds[1]["final"]["train_loss"]


def test_lr_grid_starts_a_cells_seeds_once_its_own_grid_is_done_not_every_cells():
    from timm_ortho.train.many_runs import run_lr_grid

    # Two processes: the slow cell's grid run (about 7 s) occupies one, the fast cell (two runs of a
    # few ms) goes through the other. Seeds queued only after every cell's grid would wait for the
    # slow run, leaving a process idle; here the fast cell's seed ends before the slow grid run.
    kwargs = {"img_size": 8, "n_train": 64, "n_val": 32}
    slow = RunConfig(model="plain_cnn20", method="l2", steps=800, batch_size=8, record_every=800)
    fast = RunConfig(model="plain_cnn20", method="l2", steps=2, batch_size=8, record_every=2)
    order = []
    slow_cell, fast_cell = run_lr_grid(
        [(slow, kwargs), (fast, kwargs)],
        [0.01],
        [5, 6],
        jobs=2,
        on_result=lambda i, r: order.append((i, r["config"]["seed"])),
    )
    assert sorted(order) == [(0, 5), (0, 6), (1, 5), (1, 6)]
    assert order.index((1, 6)) < order.index((0, 5))
    # The records are those of the same run alone in this process, on a worker's share of the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        alone = run(replace(fast, lr=0.01, seed=6), load_tensor_data(**kwargs))
    finally:
        torch.set_num_threads(threads)
    assert fast_cell.seeds[1]["final"] == alone["final"]
    assert slow_cell.lr == fast_cell.lr == 0.01


def test_a_failing_run_stops_the_queue_and_keeps_the_runs_under_way():
    kwargs = {"img_size": 8, "n_train": 64, "n_val": 32}
    good = RunConfig(model="plain_cnn20", method="l2", steps=300, batch_size=8, record_every=300)
    bad = replace(good, model="no_such_model")
    reported = []
    with pytest.raises(KeyError, match="no_such_model"):
        run_many([bad] + [good] * 6, kwargs, jobs=2, on_result=lambda i, r: reported.append(i))
    # The good run that was under way when the bad one failed ended and was reported (its work is
    # kept for a resume); the runs still queued were cancelled, not run and thrown away.
    assert 1 <= len(reported) < 6


def test_warmup_holds_the_lr_until_the_training_error_falls(data):
    from timm_ortho.train.experiments import WARMUP_LR

    cfg = RunConfig(model="cifar_resnet20", method="l2", steps=30, batch_size=16, record_every=1, warmup=True)
    record = run(cfg, data)
    steps = record["final"]["warmup_steps"]
    lrs = [h["lr"] for h in record["history"]]
    assert 1 <= steps <= 30
    assert all(lr == WARMUP_LR for lr in lrs[: steps - 1])  # the lr in effect during the warm-up
    assert steps == 30 or lrs[steps] != WARMUP_LR  # then the schedule
    assert run(RunConfig(**{**cfg.__dict__, "warmup": False}), data)["final"]["warmup_steps"] is None


def test_the_steps_loss_and_the_training_sets_eval_loss_are_recorded_apart(data):
    # 20 steps: the last tenth is the last two steps, which the last history window (2 steps) averages.
    cfg = RunConfig(model="plain_cnn20", method="l2", steps=20, batch_size=8, record_every=2)
    final, history = (record := run(cfg, data))["final"], record["history"]
    assert final["step_loss"] == pytest.approx(history[-1]["loss"], rel=1e-6)
    # train_loss is the eval-mode loss over all 64 training images: not the steps' mean.
    assert math.isfinite(final["train_loss"]) and final["train_loss"] != final["step_loss"]


def test_none_regime_bare_bound_and_train_metrics(data):
    cfg = RunConfig(model="plain_cnn20", method="none", steps=2, batch_size=8, record_every=2)
    record = run(cfg, data)
    final = record["final"]
    assert 0 <= final["train_acc"] <= 1 and math.isfinite(final["train_loss"])
    bounded = run(RunConfig(**{**cfg.__dict__, "max_grad_ratio": "auto"}), data)
    assert bounded["final"]["train_loss"] != final["train_loss"]  # the bound acted on the bare optimizer


def test_label_noise_moves_the_chosen_training_labels_only():
    clean = load_tensor_data(img_size=8, n_train=200, n_val=40)
    noisy = load_tensor_data(img_size=8, n_train=200, n_val=40, label_noise=0.25)
    changed = (clean.y_train != noisy.y_train).sum().item()
    assert changed == 50 and torch.equal(clean.y_val, noisy.y_val)
    assert torch.equal(clean.x_train, noisy.x_train) and "25%" in noisy.source
    with pytest.raises(ValueError, match="label_noise"):
        load_tensor_data(img_size=8, n_train=20, n_val=4, label_noise=1.0)


_KILLED_SUITE = '''
import os, signal, sys, threading, time
from pathlib import Path
from timm_ortho.train.experiments import RunConfig
from timm_ortho.train.many_runs import run_many

def workers():
    """This process's pool workers (not the resource tracker), from /proc."""
    found = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except FileNotFoundError:  # ended between the two reads
                pass
    return found

def kill_myself_once_the_workers_run():
    while len(workers()) < 2:
        time.sleep(0.1)
    time.sleep(float(sys.argv[2]))  # into their runs (or still importing: either must end)
    Path(sys.argv[1]).write_text(" ".join(map(str, workers())))
    os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":
    threading.Thread(target=kill_myself_once_the_workers_run, daemon=True).start()
    endless = RunConfig(model="plain_cnn20", method="ortho", steps=10**7, batch_size=8, record_every=10**7)
    run_many([endless, endless], {"img_size": 8, "n_train": 64, "n_val": 32}, jobs=2)
'''


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped by its new parent, has ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.skipif(
    not Path(f"/proc/self/task/{os.getpid()}/children").exists(),
    reason="reads a process's children from /proc (a kernel without CONFIG_PROC_CHILDREN has none)",
)
@pytest.mark.parametrize("delay", [0.0, 8.0], ids=["while-starting", "mid-run"])
def test_a_suite_killed_by_a_signal_takes_its_worker_processes_with_it(tmp_path, delay):
    script, pids = tmp_path / "suite.py", tmp_path / "workers"
    script.write_text(_KILLED_SUITE)
    done = subprocess.run([sys.executable, str(script), str(pids), str(delay)], timeout=120, check=False)
    assert done.returncode == -signal.SIGKILL
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == 2
    give_up = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < give_up:
        time.sleep(0.2)
    outlived = [pid for pid in workers if _alive(pid)]
    for pid in outlived:  # endless runs: never leave them to the rest of the test session
        os.kill(pid, signal.SIGKILL)
    assert not outlived, "a worker outlived its killed suite"
