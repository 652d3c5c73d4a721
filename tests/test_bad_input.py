"""Every bad input a user can give the training scripts: one clear line, exit code 2, no traceback,
no run folder left behind; damaged checkpoints passed over, a failed save rescued.

Runs are a few updates of plain_cnn20 on 8x8 synthetic images, in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from timm_ortho.train.build import check_writable, discard_failed_start
from timm_ortho.train.checkpoint import (
    MARKER,
    CheckpointError,
    CheckpointManager,
    check_checkpoint,
    list_checkpoints,
    write_atomic,
)
from timm_ortho.train.config import SCHEDULERS, ConfigError
from timm_ortho.train.loop import main, train
from timm_ortho.train.resume import check_recipe, recipe_of, resolve_resume
from timm_ortho.train.validation import validate_config

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def tiny_argv(output: Path, *extra: str) -> list[str]:
    """``tiny`` as command-line flags, for ``main``."""
    return [
        "--model", "plain_cnn20", "--img-size", "8", "--synthetic-size", "32", "--synthetic-val-size", "8",
        "--batch-size", "4", "--epochs", "1", "--workers", "0", "--lr", "0.05", "--sched", "cosine",
        "--output", str(output), "--experiment", "run", *extra,
    ]  # fmt: skip


def fails_cleanly(capsys, argv: list[str], *expected: str) -> str:
    """``main(argv)`` exits with 2, one ``error:`` line holding ``expected``, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    # (a progress bar may hold the start of the line)
    line = next(line[line.index("error: ") :] for line in err.splitlines() if "error: " in line)
    for text in expected:
        assert text in line, err
    assert "Traceback" not in err, err
    return line


# ----------------------------------------------------------------------------------------------
# bad flags: checked before anything is created
# ----------------------------------------------------------------------------------------------
def test_unknown_model_suggests_close_names(tmp_path, capsys):
    line = fails_cleanly(capsys, tiny_argv(tmp_path, "--model", "plain_cnn21"), "--model plain_cnn21")
    assert "did you mean" in line and "plain_cnn20" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--lr", "-1"),
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--weight-decay", "-0.0001"),
        ("--ortho-decay", "inf"),
        ("--ortho-decay", "-1"),
        ("--momentum", "nan"),
        ("--warmup-lr", "-1"),
        ("--smoothing", "1.5"),
        ("--epochs", "0"),
        ("--batch-size", "0"),
        ("--workers", "-1"),
        ("--img-size", "0"),
        ("--max-grad-ratio", "-0.01"),
        ("--bound-momentum", "0"),
        ("--bound-momentum", "1"),
        ("--bound-momentum", "1.5"),
    ],
)
def test_numbers_out_of_range_are_refused(tmp_path, capsys, flag, value):
    fails_cleanly(capsys, tiny_argv(tmp_path, f"{flag}={value}"), flag, value)
    assert not (tmp_path / "run").exists()


def test_step_bound_takes_a_number_or_auto(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # argparse's own exit: one usage line, one error line
        main(tiny_argv(tmp_path, "--max-grad-ratio", "often"))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--max-grad-ratio: expected a number or 'auto', got 'often'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_unknown_optimizer_and_scheduler_suggest_close_names(tmp_path, capsys, tiny):
    line = fails_cleanly(capsys, tiny_argv(tmp_path, "--opt", "sgdd"), "--opt sgdd", "did you mean")
    assert "sgd" in line
    line = fails_cleanly(capsys, tiny_argv(tmp_path, "--sched", "cosin"), "--sched cosin", "cosine")
    assert not (tmp_path / "run").exists()
    validate_config(tiny(tmp_path, opt="lookahead_momentum"))  # timm's Lookahead prefix is a name too


def test_ortho_names_that_timm_lists_are_the_trainers_optimizers_too(tmp_path, capsys, tiny):
    """``ortho_<name>`` selects the method in timm's train.py (under the runner); the trainer applies
    the method itself, so to it ``--opt ortho_sgd`` is ``--opt sgd``: accepted, built once, the same
    recipe."""
    import timm

    from timm_ortho import OrthoModulated
    from timm_ortho.train.optimization import build_optimizer

    for name in ("ortho_sgd", "ortho_lookahead_momentum", "Ortho_Momentum"):
        validate_config(tiny(tmp_path, opt=name))
    assert recipe_of(tiny(tmp_path, opt="ortho_sgd"), 10) == recipe_of(tiny(tmp_path, opt="sgd"), 10)
    model = timm.create_model("plain_cnn20", num_classes=10)
    optimizer = build_optimizer(tiny(tmp_path, opt="ortho_sgd"), model, lr=0.1)[0]
    assert isinstance(optimizer, OrthoModulated) and type(optimizer.base_optimizer) is torch.optim.SGD
    # --baseline turns the method off, which ortho_<name> asks for.
    line = fails_cleanly(capsys, tiny_argv(tmp_path, "--baseline", "--opt", "ortho_sgd"), "--baseline")
    assert "--opt sgd" in line
    # Typos get close names, ortho_ or not.
    line = fails_cleanly(capsys, tiny_argv(tmp_path, "--opt", "ortho_sdg"), "--opt ortho_sdg", "did you mean")
    assert "ortho_sgd" in line and "ortho_<name>" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("sched", "expected"),
    [("plateau", "per update"), ("wsd", "--decay-epochs"), ("rsqrt", "--warmup-steps")],
)
def test_schedules_timm_cannot_build_from_the_flags_are_one_clear_line(tmp_path, capsys, sched, expected):
    """timm's own checks (an assert, ValueErrors) reach the user as one line naming the flags."""
    line = fails_cleanly(capsys, tiny_argv(tmp_path, "--sched", sched), f"--sched {sched}", expected)
    assert "Traceback" not in line
    assert not (tmp_path / "run").exists()


def test_the_scheduler_names_are_timms():
    from timm.scheduler import create_scheduler_v2

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for name in SCHEDULERS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # plateau is deprecated, still a name
            create_scheduler_v2(optimizer, sched=name, num_epochs=10, warmup_epochs=2)
    with pytest.raises(ValueError, match="Unknown scheduler"):
        create_scheduler_v2(optimizer, sched="cosin", num_epochs=10)


def test_data_dir_that_is_a_file(tmp_path, capsys):
    data = tmp_path / "data.tar"
    data.write_bytes(b"not a folder")
    fails_cleanly(capsys, tiny_argv(tmp_path / "out", "--data-dir", str(data)), str(data), "is a file")
    assert not (tmp_path / "out").exists()


def test_a_data_set_of_one_class_is_refused(tmp_path, capsys, write_image_folder):
    """Every prediction of a one-class model is right: its 100 % would say nothing, so it is refused."""
    write_image_folder(tmp_path / "one", classes=("cat",), per_class=8)
    line = fails_cleanly(
        capsys, tiny_argv(tmp_path / "out", "--data-dir", str(tmp_path / "one")), "one class"
    )
    assert str(tmp_path / "one" / "train") in line and "cat" in line and "at least two" in line
    assert not (tmp_path / "out").exists()
    # A second class folder without images is no class either (found once the images are listed).
    write_image_folder(tmp_path / "empty", classes=("cat",), per_class=8)
    for split in ("train", "val"):
        (tmp_path / "empty" / split / "dog").mkdir()
    argv = tiny_argv(tmp_path / "out", "--data-dir", str(tmp_path / "empty"))
    assert "at least two" in fails_cleanly(capsys, argv, "only one class (cat)")
    assert not (tmp_path / "out" / "run").exists()


def test_output_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    fails_cleanly(capsys, tiny_argv(blocker / "out"), str(blocker), "is a file")

    # A folder that refuses new files (permission bits do not stop root, so the probe is made to fail).
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(ConfigError, match=r"cannot write into .* choose a writable --output"):
        check_writable(tmp_path / "out" / "run")
    fails_cleanly(capsys, tiny_argv(tmp_path / "out"), "Permission denied", "--output")
    assert not (tmp_path / "out").exists()


def test_a_failed_start_leaves_no_run_folder(tmp_path, capsys):
    broken = tmp_path / "cifar" / "cifar-10-batches-py"
    broken.mkdir(parents=True)
    (broken / "batches.meta").write_bytes(b"")
    fails_cleanly(capsys, tiny_argv(tmp_path / "out", "--data-dir", str(tmp_path / "cifar")), "data_batch_1")
    assert not (tmp_path / "out").exists()
    # A start that fails later (once the run is being built) can discard what it wrote before its
    # first update; anything more is kept.
    run = tmp_path / "out" / "run"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps({"type": "config"}) + "\n")
    assert discard_failed_start(run) and not run.exists()
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 1}) + "\n")
    assert not discard_failed_start(run) and run.exists()


def test_strict_data_stops_at_the_first_corrupt_image(tmp_path, capsys, write_image_folder, tiny):
    write_image_folder(tmp_path / "data", per_class=4)
    bad = sorted((tmp_path / "data" / "train" / "dog").iterdir())[1]
    bad.write_bytes(b"\x89PNG garbage")
    result = train(tiny(tmp_path, data_dir=str(tmp_path / "data"), max_steps=1))  # skipped, not fatal
    assert result.summary["updates"] == 1
    argv = tiny_argv(
        tmp_path, "--data-dir", str(tmp_path / "data"), "--experiment", "strict", "--strict-data"
    )
    fails_cleanly(capsys, argv, str(bad), "--strict-data")


# ----------------------------------------------------------------------------------------------
# resume: damaged checkpoints, another recipe
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny):
    """A run folder with intact checkpoints at updates 2, 4 and 6 (made once, copied per test)."""
    from accelerate.state import AcceleratorState, GradientState

    root = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(tiny(root, max_steps=6, checkpoint_interval=2, checkpoint_hist=10, precise_bn=0))
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return root / "run"


def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def test_markers_record_sizes_crcs_and_the_recipe(trained_run, tiny):
    newest = list_checkpoints(trained_run / "checkpoints")[-1]
    marker = json.loads((newest / MARKER).read_text())
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= set(marker["files"])
    assert check_checkpoint(newest) == []
    # The loop's config.json stands in for a marker without a recipe.
    check_recipe(newest, recipe_of(tiny(trained_run), 10))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "marker"])
def test_a_damaged_newest_checkpoint_falls_back_to_an_intact_one(trained_run, tmp_path, capsys, damage, tiny):
    run = copy_run(trained_run, tmp_path)
    newest = run / "checkpoints" / "ckpt-000000006"
    file = newest / ("optimizer.bin" if damage == "garbage" else "model.safetensors")
    if damage == "truncate":
        file.write_bytes(file.read_bytes()[:100])
    elif damage == "garbage":
        file.write_bytes(os.urandom(file.stat().st_size))  # same size: the CRC tells
    elif damage == "delete":
        file.unlink()
    else:
        (newest / MARKER).write_text("{ not json")
    problems = check_checkpoint(newest)
    assert problems and (MARKER if damage == "marker" else file.name) in problems[0]

    # Named explicitly, it is refused with the file; through the run folder, the one before is used.
    fails_cleanly(capsys, tiny_argv(tmp_path, "--resume", str(newest), "--experiment", "b"), str(newest))
    assert not (tmp_path / "b").exists()
    skipped: list = []
    assert resolve_resume(str(run), None, skipped).name == "ckpt-000000004"
    assert [p for p, _ in skipped] == [newest]
    result = train(tiny(tmp_path, resume="auto", max_steps=8, precise_bn=0))
    assert result.summary["updates"] == 8
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["from"] for r in resumed if r["type"] == "resume"] == [
        str(run / "checkpoints" / "ckpt-000000004")
    ]
    assert (run / "checkpoints" / "ckpt-000000006.damaged").is_dir()  # set aside, not deleted
    assert list_checkpoints(run / "checkpoints")[-1].name == "ckpt-000000008"


def test_a_resume_path_that_does_not_exist_says_so(trained_run, tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume(str(missing), None)
    line = fails_cleanly(
        capsys, tiny_argv(tmp_path, "--resume", str(missing)), str(missing), "does not exist"
    )
    assert "no complete checkpoint" not in line
    assert not (tmp_path / "run").exists()
    # A run's last.pth stands for its newest checkpoint, also before the first epoch wrote it.
    run = copy_run(trained_run, tmp_path)
    (run / "last.pth").unlink()
    assert resolve_resume(str(run / "last.pth"), None) == run / "checkpoints" / "ckpt-000000006"


def test_a_checkpoint_folder_of_another_name_is_placed_by_its_marker(trained_run, tmp_path, capsys, tiny):
    """A complete checkpoint copied or renamed (not ckpt-<updates>) resumes; its marker gives its update."""
    run = copy_run(trained_run, tmp_path)
    backup, latest = run / "checkpoints" / "backup", run / "checkpoints" / "latest"
    shutil.copytree(run / "checkpoints" / "ckpt-000000004", backup)
    shutil.copytree(run / "checkpoints" / "ckpt-000000006", latest)
    assert list_checkpoints(run / "checkpoints")[-1].name == "ckpt-000000006"  # rotation ignores them
    # Older than the folder's newest and continuing in it: refused as ckpt-000000004 itself would be.
    fails_cleanly(capsys, tiny_argv(tmp_path, "--resume", str(backup)), "--experiment NAME to branch")
    result = train(tiny(tmp_path, resume=str(latest), max_steps=8, precise_bn=0))
    assert result.summary["updates"] == 8


def test_no_intact_checkpoint_left_says_so(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    for ckpt in list_checkpoints(run / "checkpoints"):
        (ckpt / "random_states_0.pkl").write_bytes(b"")
    fails_cleanly(capsys, tiny_argv(tmp_path, "--resume", "auto"), "every checkpoint found is damaged")
    with pytest.raises(CheckpointError, match=r"random_states_0\.pkl"):
        resolve_resume("auto", run)


def test_resume_with_another_model_or_recipe_is_refused(trained_run, tmp_path, capsys):
    copy_run(trained_run, tmp_path)
    line = fails_cleanly(
        capsys, tiny_argv(tmp_path, "--resume", "auto", "--model", "plain_cnn32"), "another recipe"
    )
    assert "model 'plain_cnn20' in the checkpoint, 'plain_cnn32' now" in line
    line = fails_cleanly(capsys, tiny_argv(tmp_path, "--resume", "auto", "--baseline", "--model-ema"))
    assert "method" in line and "model_ema" in line
    line = fails_cleanly(capsys, tiny_argv(tmp_path, "--resume", "auto", "--num-classes", "7"))
    assert "num_classes 10 in the checkpoint, 7 now" in line
    # A schedule adds a registered object; other schedule settings are rebuilt from the flags instead.
    line = fails_cleanly(capsys, tiny_argv(tmp_path, "--resume", "auto", "--sched", "none"))
    assert "lr_scheduler True in the checkpoint, False now" in line


# ----------------------------------------------------------------------------------------------
# writing: retried once, then rescued elsewhere
# ----------------------------------------------------------------------------------------------
class FlakyAccelerator:
    """The members CheckpointManager uses; ``save_state`` fails where a path starts with ``broken``."""

    is_main_process = True
    num_processes = 1

    def __init__(self, broken: list[Path], failures: int = 99):
        self.broken, self.failures, self.calls = broken, failures, 0

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        self.calls += 1
        if self.failures > 0 and any(str(path).startswith(str(b)) for b in self.broken):
            self.failures -= 1
            raise OSError(28, "No space left on device")
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"weights")


def test_a_failed_save_is_retried_once(tmp_path):
    acc = FlakyAccelerator([tmp_path / "run"], failures=1)
    manager = CheckpointManager(acc, tmp_path / "run" / "checkpoints", recipe={"model": "m"})
    folder = manager.save(5)
    assert acc.calls == 2 and check_checkpoint(folder) == []
    assert json.loads((folder / MARKER).read_text())["recipe"] == {"model": "m"}


def test_a_save_that_keeps_failing_is_rescued_and_says_where(tmp_path):
    rescue = tmp_path / "rescue"
    acc = FlakyAccelerator([tmp_path / "run"])
    manager = CheckpointManager(acc, tmp_path / "run" / "checkpoints", fallback=rescue)
    with pytest.raises(CheckpointError) as caught:
        manager.save(7)
    message = str(caught.value)
    assert str(tmp_path / "run" / "checkpoints") in message and "No space left" in message
    assert f"--resume {rescue / 'ckpt-000000007'}" in message and "--experiment run" in message
    assert check_checkpoint(rescue / "ckpt-000000007") == []

    acc = FlakyAccelerator([tmp_path / "run", rescue])
    with pytest.raises(CheckpointError, match="only in memory"):
        CheckpointManager(acc, tmp_path / "run" / "checkpoints", fallback=rescue).save(8)


def test_an_unwritable_checkpoint_folder_mid_run_loses_nothing(tmp_path, capsys, monkeypatch, tiny):
    """The run's checkpoints folder cannot be created: the error names it and where the state went;
    resuming from there continues the run."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("in the way")
    line = fails_cleanly(capsys, tiny_argv(tmp_path, "--max-steps", "3", "--precise-bn", "0"), "tried twice")
    rescued = tmp_path / "tmp" / "timm_ortho-rescue" / "run" / "checkpoints" / "ckpt-000000003"
    assert str(tmp_path / "run" / "checkpoints") in line and f"--resume {rescued}" in line
    (tmp_path / "run" / "checkpoints").unlink()
    result = train(tiny(tmp_path, resume=str(rescued), max_steps=4, precise_bn=0))
    assert result.summary["updates"] == 4 and result.run_dir == tmp_path / "run"


def test_weights_files_are_written_atomically_or_not_at_all(tmp_path):
    write_atomic({"w": torch.ones(2)}, tmp_path / "last.pth")
    assert torch.equal(torch.load(tmp_path / "last.pth", weights_only=True)["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match=f"cannot write {tmp_path / 'gone' / 'last.pth'}"):
        write_atomic({"w": torch.ones(2)}, tmp_path / "gone" / "last.pth")
