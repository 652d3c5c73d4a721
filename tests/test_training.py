"""The training loop, its checkpoints and the scripts, end to end on tiny data.

Every run here is a few updates of plain_cnn20 on 8x8 images, in-process (accelerate's global state
is reset between tests), except the script exit-code test and the two-process test, which launch
real processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm_ortho.train.checkpoint import MARKER, CheckpointManager, latest_checkpoint, list_checkpoints
from timm_ortho.train.config import (
    CIFAR_PROTOCOL,
    ConfigError,
    TrainConfig,
    build_parser,
    config_from_args,
)
from timm_ortho.train.loop import TrainResult, main, train
from timm_ortho.train.optimization import build_schedule
from timm_ortho.train.resume import resolve_resume
from timm_ortho.train.tracking import ratio_history
from timm_ortho.train.validation import validate_config

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------
def test_synthetic_end_to_end(tmp_path, tiny):
    import timm
    from accelerate.utils import is_tensorboard_available

    # A tracker that is not installed is skipped with a warning; one that is gets the scalars.
    cfg = tiny(tmp_path, modulation=True, lr=None, lr_base=0.1, lr_base_size=256, log_with=["tensorboard"])
    result = train(cfg)
    run = tmp_path / "run"
    s = result.summary
    assert result.run_dir == run and s["updates"] == 8 and s["synthetic"]
    assert 0.0 <= s["final_eval"]["top1"] <= s["final_eval"]["top5"] <= 100.0

    recs = records(run)
    kinds = [r["type"] for r in recs]
    assert kinds[0] == "config" and kinds[-1] == "summary" and kinds.count("eval") == 1
    header = recs[0]
    assert header["lr"] == pytest.approx(0.1 * 4 / 256)  # scaled by the global batch
    assert header["synthetic"] and header["processes"] == 1 and header["mixed_precision"] == "no"
    steps = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for r in steps:
        assert (
            torch.isfinite(torch.tensor(r["loss"]))
            and r["ortho_penalty"] >= 0
            and r["mod_bottom_top_ratio"] > 0
        )
    layers = [r for r in recs if r["type"] == "layers"]
    assert len(layers[0]["q_before"]) == len(layers[0]["names"]) == 19  # 19 convs, classifier left out
    assert len(layers[0]["ortho_residual"]) == 20

    for name in ("training_curves.png", "error_moments.png", "bottom_top_ratio.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(s["plots"]) == 3
    # One epoch numbering: counted from 1 in every record, file and line a user reads.
    assert {r["epoch"] for r in steps} == {1} and [r["epoch"] for r in recs if r["type"] == "eval"] == [1]
    assert s["best_epoch"] == 1
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["ckpt-000000008"]
    saved = torch.load(run / "last.pth", weights_only=True)
    assert saved["epoch"] == 1
    fresh = timm.create_model("plain_cnn20", num_classes=10)
    fresh.load_state_dict(saved["state_dict"])  # a timm-loadable checkpoint
    assert states_equal(fresh.state_dict(), result.model.state_dict())
    assert (run / "model_best.pth").is_file()
    assert json.loads((run / "summary.json").read_text())["updates"] == 8
    if is_tensorboard_available():
        assert any(run.rglob("events.out.tfevents.*"))


def test_a_short_run_logs_every_epoch_and_draws_every_plot(tmp_path, tiny):
    """Fewer updates than --log-interval (default 50): a train record still closes every epoch, and
    every figure docs/training.md lists is drawn."""
    result = train(tiny(tmp_path, epochs=2, synthetic_size=16, log_interval=50, precise_bn=0))
    recs = records(tmp_path / "run")
    assert [(r["step"], r["epoch"]) for r in recs if r["type"] == "train"] == [(4, 1), (8, 2)]
    assert [r["step"] for r in recs if r["type"] == "layers"] == [4, 8]
    names = ("training_curves.png", "error_moments.png", "bottom_top_ratio.png")
    assert sorted(Path(p).name for p in result.summary["plots"]) == sorted(names)
    assert all((tmp_path / "run" / name).is_file() for name in names)
    # An interval that ends before the epoch does: logged at its end and again at the epoch's, once each.
    train(tiny(tmp_path, experiment="three", epochs=2, synthetic_size=16, log_interval=3, precise_bn=0))
    assert [r["step"] for r in records(tmp_path / "three") if r["type"] == "train"] == [3, 4, 6, 8]


def test_image_folder_run_with_timm_augmentation(tmp_path, write_image_folder, tiny):
    write_image_folder(tmp_path / "data", per_class=4)
    cfg = tiny(
        tmp_path,
        data_dir=str(tmp_path / "data"),
        aa="rand-m9-mstd0.5",
        reprob=0.25,
        mixup=0.2,
        cutmix=1.0,
        smoothing=0.1,
        model_ema=True,
        max_steps=2,
    )
    result = train(cfg)
    assert result.summary["updates"] == 2 and "ImageFolder" in result.summary["data"]
    assert result.model.get_classifier().out_features == 3
    assert result.summary["ema_eval"] is not None


def test_top5_is_reported_only_where_it_means_something(tmp_path, caplog, write_image_folder, tiny):
    """With 5 classes or fewer every label is among the top 5: top-5 is said to be left out, once."""
    write_image_folder(tmp_path / "data", per_class=4)  # 3 classes
    with caplog.at_level("INFO"):
        result = train(tiny(tmp_path, data_dir=str(tmp_path / "data"), epochs=2, precise_bn=0))
    assert set(result.summary["final_eval"]) == {"loss", "top1"}
    evals = [r for r in records(tmp_path / "run") if r["type"] == "eval"]
    assert len(evals) == 2 and not any("val_top5" in r for r in evals)
    assert caplog.text.count("top-5 is not reported: with 3 classes") == 1
    assert "top-5" not in caplog.text.replace("top-5 is not reported", "")
    assert (tmp_path / "run" / "training_curves.png").is_file()


def test_cifar_protocol_on_a_pickle_directory(tmp_path, write_cifar):
    write_cifar(tmp_path / "data", per_batch=4)
    args = build_parser("cifar").parse_args(
        [
            "--data-dir",
            str(tmp_path / "data"),
            "--model",
            "plain_cnn20",
            "--batch-size",
            "4",
            "--iterations",
            "4",
            "--decay-steps",
            "2",
            "3",
            "--workers",
            "0",
            "--log-interval",
            "1",
            "--output",
            str(tmp_path),
            "--experiment",
            "cifar",
        ]
    )
    result = train(config_from_args(args))
    assert result.summary["updates"] == 4 and "CIFAR-10" in result.summary["data"]
    lrs = [r["lr"] for r in records(tmp_path / "cifar") if r["type"] == "train"]
    # The lr logged after update u is the one for update u + 1: 0.1 before 2, /10 from 2, /100 from 3.
    assert lrs == pytest.approx([0.1, 0.01, 0.001, 0.001])


def test_cifar_defaults_are_the_papers_protocol():
    cfg = config_from_args(build_parser("cifar").parse_args([]))
    assert (cfg.batch_size, cfg.lr, cfg.momentum, cfg.opt) == (128, 0.1, 0.9, "momentum")
    assert (cfg.iterations, cfg.decay_steps, cfg.sched, cfg.augment) == (
        64000,
        [32000, 48000],
        "multistep",
        "none",
    )
    assert cfg.model == CIFAR_PROTOCOL["model"] == "plain_cnn44" and not cfg.baseline
    assert config_from_args(build_parser("cifar").parse_args(["--augment", "cifar"])).augment == "cifar"

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.lr, momentum=cfg.momentum)
    scheduler, total, epochs = build_schedule(cfg, opt, updates_per_epoch=390)
    assert total == 64000 and epochs == 165
    for t, expected in [(0, 0.1), (31999, 0.1), (32000, 0.01), (47999, 0.01), (48000, 0.001), (63999, 0.001)]:
        scheduler.step_update(t)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected), t


def test_baseline_uses_l2_and_the_method_does_not(tmp_path, tiny):
    import timm

    model = timm.create_model("plain_cnn20", num_classes=10)
    from timm_ortho import param_groups_for_ortho
    from timm_ortho.targets import find_targets

    targets = find_targets(model)
    groups = param_groups_for_ortho(model, weight_decay=5e-4, targets=targets)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert all(decay[id(t.param)] == 0.0 for t in targets)
    assert len(decay) == len(list(model.parameters()))

    result = train(tiny(tmp_path, baseline=True, max_steps=2))
    assert result.summary["method"].startswith("baseline: msra init, L2 weight decay")
    steps = [r for r in records(tmp_path / "run") if r["type"] == "train"]
    assert "ortho_penalty" not in steps[0] and steps[0]["mod_layers_rescaled"] == 0


def test_bf16_on_cpu(tmp_path, monkeypatch, tiny):
    import timm_ortho.train.build as build

    dtypes: list[torch.dtype] = []
    create = build.create_model

    def recording(cfg, num_classes):
        model, desc = create(cfg, num_classes)
        model.stem.conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        return model, desc

    monkeypatch.setattr(build, "create_model", recording)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    result = train(tiny(tmp_path, modulation=True, max_steps=3))
    assert result.summary["mixed_precision"] == "bf16"
    assert torch.bfloat16 in dtypes  # the forward really ran under bf16 autocast
    losses = [r["loss"] for r in records(tmp_path / "run") if r["type"] == "train"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in result.model.parameters())


# ----------------------------------------------------------------------------------------------
# exact resume
# ----------------------------------------------------------------------------------------------
def test_resume_gives_bit_identical_weights(tmp_path, tiny):
    """Interrupt, resume, and end with exactly the weights of an uninterrupted run.

    The run uses everything that carries state or randomness: random augmentation (crop, flip,
    colour, random erasing), mixup, gradient accumulation, error modulation, the orthonormality
    term, momentum, a cosine schedule with warmup and an EMA of the weights; 2 epochs of 5 updates.
    """
    common = dict(
        synthetic_size=40,
        grad_accum_steps=2,
        epochs=2,
        modulation=True,
        reprob=0.25,
        mixup=0.2,
        model_ema=True,
        model_ema_decay=0.5,
        warmup_steps=2,
        checkpoint_interval=3,
        checkpoint_hist=10,
        bound_momentum=0.9,  # the step bound's running averages are part of the optimizer's state
    )
    full = train(tiny(tmp_path, experiment="full", **common))
    assert full.summary["updates"] == 10
    saved = [p.name for p in list_checkpoints(tmp_path / "full" / "checkpoints")]
    assert saved == [f"ckpt-{u:09d}" for u in (3, 5, 6, 9, 10)]  # every 3 updates and at epoch ends

    # Interrupted after 4 updates (mid-epoch, between two periodic checkpoints), then --resume auto.
    # The first launch already says --resume auto: with no checkpoint yet it starts from scratch.
    first = train(tiny(tmp_path, experiment="cut", resume="auto", max_steps=4, **common))
    assert first.summary["updates"] == 4
    assert not states_equal(first.model.state_dict(), full.model.state_dict())
    resumed = train(tiny(tmp_path, experiment="cut", resume="auto", **common))
    assert resumed.summary["updates"] == 10
    assert states_equal(resumed.model.state_dict(), full.model.state_dict())
    assert states_equal(resumed.ema_model.state_dict(), full.ema_model.state_dict())
    assert any(r["type"] == "resume" for r in records(tmp_path / "cut"))
    # The run's history spans the interruption: every update logged once, in order.
    history = ratio_history(tmp_path / "cut" / "metrics.jsonl", unmodulated=True)
    assert history["as trained"][0] == list(range(1, 11))
    assert (tmp_path / "cut" / "bottom_top_ratio.png").is_file()

    # From a periodic checkpoint in the second epoch, into a new run folder.
    ckpt = tmp_path / "full" / "checkpoints" / "ckpt-000000006"
    again = train(tiny(tmp_path, experiment="again", resume=str(ckpt), **common))
    assert states_equal(again.model.state_dict(), full.model.state_dict())


def test_resume_to_a_longer_run_follows_the_longer_schedule(tmp_path, caplog, tiny):
    """docs/timm.md's "continue to epoch 4": 2 cosine epochs, then --epochs 4 --resume <run>/last.pth.

    The resumed run must train on the cosine schedule of 4 epochs (as timm's train.py rebuilds its
    scheduler from the new flags), not on the first run's, which has reached its end (lr 0).
    """
    import math

    from safetensors.torch import load_file

    common = dict(synthetic_size=16, precise_bn=0, lr=0.05, sched="cosine", checkpoint_hist=10)
    train(tiny(tmp_path, epochs=2, **common))
    with caplog.at_level("INFO"):
        resumed = train(tiny(tmp_path, epochs=4, resume=str(tmp_path / "run" / "last.pth"), **common))
    assert resumed.summary["updates"] == 16
    assert "4 epochs" in caplog.text and "schedule rebuilt" in caplog.text
    # The lr logged after update u is the one of update u + 1: cosine from 0.05 to 0 over 16 updates.
    lrs = {r["step"]: r["lr"] for r in records(tmp_path / "run") if r["type"] == "train"}
    expected = [0.5 * 0.05 * (1 + math.cos(math.pi * u / 16)) for u in range(9, 17)]
    assert [lrs[u] for u in range(9, 17)] == pytest.approx(expected, abs=1e-12)
    assert all(lrs[u] > 0 for u in range(9, 16))
    # The updates after the resume move the weights (at lr 0 they would stay as they were at 8).
    folder = tmp_path / "run" / "checkpoints"
    conv = [
        load_file(folder / f"ckpt-{u:09d}" / "model.safetensors")["stem.conv.weight"] for u in [8, 12, 16]
    ]
    assert not torch.equal(conv[0], conv[1]) and not torch.equal(conv[1], conv[2])


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
class FakeAccelerator:
    """The three members CheckpointManager uses; save_state writes a file (or fails half-way)."""

    is_main_process = True

    def __init__(self):
        self.fail = False

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_text("weights")
        if self.fail:
            raise KeyboardInterrupt("killed during the save")


def test_checkpoints_rotate_and_survive_an_interrupted_save(tmp_path):
    acc = FakeAccelerator()
    manager = CheckpointManager(acc, tmp_path / "checkpoints", keep=2)
    for updates in (10, 20, 30):
        folder = manager.save(updates, {"epoch": 1})
        assert json.loads((folder / MARKER).read_text())["updates"] == updates
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [
        "ckpt-000000020",
        "ckpt-000000030",
    ]

    acc.fail = True
    with pytest.raises(KeyboardInterrupt):
        manager.save(40)
    assert (tmp_path / "checkpoints" / ".tmp-ckpt-000000040").is_dir()  # the partial save
    assert latest_checkpoint(tmp_path / "checkpoints").name == "ckpt-000000030"  # the last good one
    assert resolve_resume(str(tmp_path), None).name == "ckpt-000000030"
    assert resolve_resume("auto", tmp_path).name == "ckpt-000000030"

    acc.fail = False
    manager.save(30)  # the same update count again replaces the folder
    manager.save(50)  # and the next save clears the partial one
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "ckpt-000000030",
        "ckpt-000000050",
    ]


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path), None)
    partial = tmp_path / "checkpoints" / "ckpt-000000007"
    partial.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        resolve_resume(str(partial), None)
    with pytest.raises(FileNotFoundError, match="--experiment"):
        resolve_resume("auto", None)
    assert main(["--resume", str(tmp_path), "--output", str(tmp_path)]) == 2


def test_resume_accepts_a_file_like_timms_resume(tmp_path):
    """timm's --resume takes a checkpoint file: a file in a checkpoint folder, or a run's last.pth."""
    run = tmp_path / "run"
    for updates in (5, 9):
        folder = run / "checkpoints" / f"ckpt-{updates:09d}"
        folder.mkdir(parents=True)
        (folder / MARKER).write_text(json.dumps({"updates": updates}))
        (folder / "model.safetensors").write_bytes(b"")
    older = run / "checkpoints" / "ckpt-000000005"
    assert resolve_resume(str(older / "model.safetensors"), None) == older
    (run / "last.pth").write_bytes(b"")
    assert resolve_resume(str(run / "last.pth"), None) == run / "checkpoints" / "ckpt-000000009"
    (run / "model_best.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="hold no optimizer state"):
        resolve_resume(str(run / "model_best.pth"), None)
    partial = run / "checkpoints" / "ckpt-000000011"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="incomplete checkpoint"):
        resolve_resume(str(partial / "model.safetensors"), None)


def test_timm_flag_names_are_accepted():
    args = build_parser().parse_args(
        ["--amp", "--amp-dtype", "bfloat16", "--log-wandb", "--log-with", "tensorboard", "-vb", "7"]
    )
    cfg = config_from_args(args)
    assert cfg.amp and cfg.amp_dtype == "bfloat16" and cfg.validation_batch_size == 7
    assert cfg.log_with == ["wandb", "tensorboard"]  # in either order, nothing is lost
    cfg = config_from_args(build_parser().parse_args(["--log-with", "tensorboard", "--log-wandb"]))
    assert cfg.log_with == ["tensorboard", "wandb"]
    cfg = config_from_args(build_parser("cifar").parse_args([]))
    assert not cfg.amp and cfg.amp_dtype == "float16" and cfg.log_with is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--amp-dtype", "float64"])


def test_modulation_is_one_setting_and_the_mod_flags_are_its_aliases():
    def parsed(*argv):
        return config_from_args(build_parser().parse_args(list(argv)))

    assert parsed().modulation == "auto" == parsed().modulation_setting()  # on for plain chains only
    assert parsed("--modulation").modulation is True and parsed("--modulation").modulation_setting() is True
    assert parsed("--modulation", "paper").modulation == "paper"
    with pytest.raises(SystemExit):
        parsed("--modulation", "papre")
    cfg = parsed("--modulation", "band=2", "mode=match", "schedule=100")
    assert cfg.modulation == {"band": 2, "mode": "match", "schedule": 100}
    # The old flags set one option each, before or after --modulation, and need it to take effect.
    cfg = parsed("--mod-band", "1.5", "--modulation", "mode=match", "--no-mod-include-classifier")
    assert cfg.modulation == {"band": 1.5, "mode": "match", "include_classifier": False}
    assert parsed("--mod-band", "2").modulation == "auto"
    assert parsed("--modulation", "--mod-schedule", "0").modulation_setting() == {}  # 0: always
    assert parsed("--modulation", "--no-modulation").modulation is False
    cfg = parsed("--model-kwargs", "act_layer=relu", "depth=3", "--no-aug", "--pin-mem", "-j", "3")
    assert cfg.model_kwargs == {"act_layer": "relu", "depth": 3} and cfg.augment == "none"
    assert cfg.pin_memory is True and cfg.workers == 3
    with pytest.raises(ConfigError, match="--baseline means no modulation"):
        validate_config(parsed("--baseline", "--modulation", "band=2"))


@pytest.mark.parametrize("preset", ["imagenet", "cifar"])
def test_help_shows_every_default_once(preset):
    import argparse

    parser = build_parser(preset)
    formatter = parser._get_formatter()
    shown = 0
    for action in parser._actions:
        text = " ".join(formatter._format_action(action).split())
        if isinstance(action, argparse._HelpAction):
            continue
        if action.default is argparse.SUPPRESS:  # an alias of another flag, which shows the default
            assert "same as --" in text and "default" not in text, text
            continue
        assert text.count("default") == 1 and f"(default: {action.default})" in text, text
        shown += 1
    assert " ".join(parser.format_help().split()).count("(default: ") == shown > 80


def test_amp_flag_sets_mixed_precision(tmp_path, tiny):
    result = train(tiny(tmp_path, amp=True, amp_dtype="bfloat16", max_steps=1))
    assert result.summary["mixed_precision"] == "bf16"


def test_trainer_builds_the_optimizer_with_timms_factory(tmp_path, monkeypatch, tiny):
    """The script's optimizer is timm_ortho.create_optimizer: timm's param groups, targets without L2,
    the targets the trainer found (once) handed over."""
    import timm_ortho

    calls = []
    create = timm_ortho.create_optimizer

    def recording(model, opt, **kwargs):
        calls.append((opt, kwargs))
        return create(model, opt, **kwargs)

    monkeypatch.setattr(timm_ortho, "create_optimizer", recording)
    train(tiny(tmp_path, max_steps=1, ortho_exclude=["head.fc.weight"], weight_decay=1e-3))
    ((opt, kwargs),) = calls
    assert opt == "momentum" and kwargs["weight_decay"] == 1e-3
    names = [t.name for t in kwargs["target_kwargs"]["targets"]]
    assert len(names) == 19 and "head.fc.weight" not in names  # the excluded weight is no target


def test_one_run_folder_holds_one_timeline(tmp_path, capsys):
    for updates in (5, 9):
        folder = tmp_path / "run" / "checkpoints" / f"ckpt-{updates:09d}"
        folder.mkdir(parents=True)
        (folder / MARKER).write_text(json.dumps({"updates": updates}))
    # A fresh run into it would interleave its checkpoints with the old ones.
    assert main(["--output", str(tmp_path), "--experiment", "run"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    # So would a resume from the older checkpoint that continues in the same folder.
    older = tmp_path / "run" / "checkpoints" / "ckpt-000000005"
    assert main(["--output", str(tmp_path), "--resume", str(older)]) == 2
    assert "--experiment NAME to branch" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------
def test_bad_data_path_fails_with_a_clear_message(tmp_path, capsys):
    missing = tmp_path / "imagenet"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_imagenet.py"), "--data-dir", str(missing)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "<data-dir>/train/<class name>" in proc.stderr
    assert "Traceback" not in proc.stderr

    broken = tmp_path / "cifar" / "cifar-10-batches-py"
    broken.mkdir(parents=True)
    (broken / "batches.meta").write_bytes(b"")
    assert main(["--data-dir", str(tmp_path / "cifar"), "--output", str(tmp_path)], preset="cifar") == 2
    err = capsys.readouterr().err
    assert "missing data_batch_1" in err and str(broken) in err


def test_the_trainer_is_a_console_command_and_a_module():
    """``timm-ortho-train`` (pyproject's entry point) and ``python -m timm_ortho.train`` are the
    trainer of scripts/train_imagenet.py."""
    import importlib
    import re

    from timm_ortho.train import loop

    # (tomllib only from Python 3.11; the section's lines are simple enough to read directly)
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^"?([\w-]+)"?\s*=\s*"([^"]+)"', section, flags=re.M))
    module, _, name = scripts["timm-ortho-train"].partition(":")
    assert getattr(importlib.import_module(module), name) is loop.main
    proc = subprocess.run(
        [sys.executable, "-m", "timm_ortho.train", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m timm_ortho.train ")
    assert "orthonormality" in proc.stdout and "--resume" in proc.stdout
    assert "(default: plain_cnn44_imagenet)" in " ".join(proc.stdout.split())  # the imagenet preset


def launch_two(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch`` of tests/ddp_helper.py on two CPU processes."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})}
    for key in [k for k in env if k.startswith("ACCELERATE_")]:
        env.pop(key)
    cmd = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "tests" / "ddp_helper.py"),
        *("--model", "plain_cnn20", "--img-size", "8", "--batch-size", "4", "--lr", "0.1"),
        *("--workers", "0", "--log-interval", "1", "--modulation", "--no-error-stats"),
        *("--output", str(tmp_path), *args),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_two_processes_on_cpu_hold_identical_weights(tmp_path):
    args = ("--synthetic-size", "32", "--synthetic-val-size", "6", "--epochs", "1", "--max-steps", "3")
    proc = launch_two(tmp_path, *args, "--experiment", "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    ranks = [torch.load(run / f"rank{i}.pt", weights_only=True) for i in (0, 1)]
    assert states_equal(ranks[0], ranks[1])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["updates"] == 3
    header = records(run)[0]
    assert header["global_batch"] == 8 and header["updates_per_epoch"] == 4


def test_two_processes_stop_together_on_a_signal_to_one_and_resume_exactly(tmp_path):
    # 12 updates in the epoch; rank 1 alone gets SIGTERM in its 2nd forward pass. The processes
    # agree every few updates (one all-reduce), so both stop after the same update, with one
    # checkpoint; resuming both ends with the weights of a run that was never stopped.
    args = ("--synthetic-size", "96", "--synthetic-val-size", "6", "--epochs", "1")
    full = launch_two(tmp_path, *args, "--experiment", "full")
    assert full.returncode == 0, full.stderr[-3000:]
    cut = launch_two(tmp_path, *args, "--experiment", "cut", env={"SIGNAL_AT": "1:2"})
    # The processes exit with 143 (SIGTERM's code) once the checkpoint is written; the launcher
    # reports that as a failure with a traceback of its own (and may end a slower process itself),
    # but no traceback passes through this project's code.
    assert cut.returncode != 0 and "exitcode  : 143" in cut.stderr, cut.stderr[-3000:]
    frames = [line for line in cut.stderr.splitlines() if line.strip().startswith('File "')]
    assert not [f for f in frames if "timm_ortho" in f or "ddp_helper" in f], cut.stderr[-3000:]
    stopped = [r for r in records(tmp_path / "cut") if r["type"] == "stopped"]
    assert len(stopped) == 1 and 1 <= stopped[0]["step"] < 12
    assert "accelerate launch" in stopped[0]["resume"] and "--resume" in stopped[0]["resume"]
    resumed = launch_two(tmp_path, *args, "--experiment", "cut", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        want = torch.load(tmp_path / "full" / f"rank{rank}.pt", weights_only=True)
        assert states_equal(torch.load(tmp_path / "cut" / f"rank{rank}.pt", weights_only=True), want)


@pytest.mark.slow
def test_a_short_run_learns_the_synthetic_set(tmp_path, tiny):
    """3 epochs of 960 16x16 images: well above chance (10%) on the held-out split."""
    cfg = tiny(tmp_path, img_size=16, synthetic_size=960, synthetic_val_size=200, batch_size=32, epochs=3)
    result = train(dataclasses.replace(cfg, lr=0.1, augment="cifar", log_interval=30))
    assert result.summary["final_eval"]["top1"] > 30.0


def test_evaluation_gives_every_module_back_its_own_mode():
    """After an evaluation the training model is as it was: a part held in eval (a frozen BN) stays so."""
    from accelerate import Accelerator

    from timm_ortho.train.evaluation import evaluate

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 4, 3)
    )
    model.train()
    model[1].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    loader = [(torch.randn(2, 3, 2, 2), torch.tensor([0, 2]))]
    evaluate(model, loader, Accelerator(cpu=True))
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_drop_path_on_a_plain_net_is_a_clear_config_error():
    from timm_ortho.train.build import create_model
    from timm_ortho.train.config import ConfigError

    with pytest.raises(ConfigError, match="drop-path"):
        create_model(TrainConfig(model="plain_cnn20", drop_path=0.1), num_classes=10)


def test_precise_bn_is_on_for_plain_nets_and_recomputes_the_statistics(tmp_path, capsys, tiny):
    from timm_ortho.precise_bn import bn_layers

    plain = train(tiny(tmp_path, experiment="plain"))
    assert "precise BN over up to 100 batches" in plain.summary["method"]
    assert "step bound |grad| <= 0.05 |W| per layer" in plain.summary["method"]  # 1/L, L = 20
    # The returned model carries statistics recomputed from scratch over N batches (the loader has 8):
    # the counter restarts at 0 and counts only those.
    assert all(int(m.num_batches_tracked) == 8 for m in bn_layers(plain.model))
    three = train(tiny(tmp_path, experiment="three", precise_bn=3))
    assert "precise BN over up to 3 batches" in three.summary["method"]
    assert all(int(m.num_batches_tracked) == 3 for m in bn_layers(three.model))
    twin = train(tiny(tmp_path, experiment="twin", model="cifar_resnet20"))
    assert "precise BN off" in twin.summary["method"]
    off = train(tiny(tmp_path, experiment="off", precise_bn=0, max_grad_ratio=0.0))
    assert "precise BN off" in off.summary["method"] and "step bound off" in off.summary["method"]
    assert all(int(m.num_batches_tracked) == 8 for m in bn_layers(off.model))  # the 8 training batches
    assert not torch.equal(three.model.stem.bn.running_mean, off.model.stem.bn.running_mean)
    assert main(["--precise-bn", "-1", "--output", str(tmp_path)]) == 2
    assert "--precise-bn takes a number of batches >= 0" in capsys.readouterr().err
    assert main(["--max-grad-ratio", "-1", "--output", str(tmp_path)]) == 2
    assert "--max-grad-ratio must be" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# divergence and stop signals
# ----------------------------------------------------------------------------------------------
RESUMABLE = dict(synthetic_size=40, grad_accum_steps=2, epochs=2, modulation=True, reprob=0.25, mixup=0.2)


def test_sigterm_saves_stops_and_resumes_bit_identically(tmp_path, monkeypatch, caplog, tiny, signal_at):
    import signal

    full = train(tiny(tmp_path, experiment="full", **RESUMABLE))
    # SIGTERM in the middle of an accumulation window of the first epoch: that update completes.
    signal_at(signal.SIGTERM, forward=5)
    with caplog.at_level("WARNING"):
        stopped = train(tiny(tmp_path, experiment="cut", **RESUMABLE))
    assert stopped.stopped_by == "SIGTERM" and stopped.summary["step"] == 3
    assert stopped.summary["checkpoint"].endswith("ckpt-000000003")
    assert "Resume with:" in caplog.text and "--resume " + stopped.summary["checkpoint"] in caplog.text
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.undo()
    resumed = train(tiny(tmp_path, experiment="cut", resume="auto", **RESUMABLE))
    assert resumed.stopped_by is None and resumed.summary["updates"] == full.summary["updates"]
    assert states_equal(resumed.model.state_dict(), full.model.state_dict())
    assert [r["type"] for r in records(tmp_path / "cut")].count("stopped") == 1


def test_sigint_at_an_epoch_end_validates_then_stops(tmp_path, monkeypatch, tiny, signal_at):
    import signal

    signal_at(signal.SIGINT, forward=10)  # the last micro-batch of epoch 1
    stopped = train(tiny(tmp_path, **RESUMABLE))
    assert stopped.stopped_by == "SIGINT" and stopped.summary["step"] == 5
    assert any(r["type"] == "eval" for r in records(tmp_path / "run"))  # the epoch was evaluated
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["ckpt-000000005"]


def test_main_exit_codes_say_why_the_run_ended(tmp_path, monkeypatch, capsys, signal_at):
    import signal

    from timm_ortho.train import loop

    args = ["--model", "plain_cnn20", "--img-size", "8", "--synthetic-size", "16", "--batch-size", "4"]
    args += ["--synthetic-val-size", "4", "--workers", "0", "--epochs", "1", "--output", str(tmp_path)]
    signal_at(signal.SIGTERM, forward=2)
    assert main([*args, "--experiment", "term"]) == 143

    def abort(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", abort)
    assert main([*args, "--experiment", "abort"]) == 130
    assert "aborted" in capsys.readouterr().err


def test_divergence_stops_at_once_and_saves_nothing(tmp_path, capsys):
    args = ["--model", "plain_cnn20", "--img-size", "8", "--synthetic-size", "32", "--batch-size", "4"]
    args += ["--synthetic-val-size", "4", "--workers", "0", "--epochs", "2", "--output", str(tmp_path)]
    args += ["--baseline", "--lr", "1e30", "--log-interval", "100", "--experiment", "nan"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "training diverged at update" in err and "Try: lower --lr" in err and "Traceback" not in err
    run = tmp_path / "nan"
    assert not list_checkpoints(run / "checkpoints")
    assert not (run / "last.pth").exists() and not (run / "model_best.pth").exists()


def test_skip_nonfinite_skips_bad_updates_within_its_bound(tmp_path, monkeypatch, tiny):
    from timm_ortho.train import build

    original = build.build_loss

    def loss_with_a_nan(cfg, num_classes):
        mixup, loss = original(cfg, num_classes)
        calls = [0]

        def poisoned(logits, target):
            calls[0] += 1
            value = loss(logits, target)
            return value * float("nan") if calls[0] in (2, 3) else value

        return mixup, poisoned

    monkeypatch.setattr(build, "build_loss", loss_with_a_nan)
    result = train(tiny(tmp_path, skip_nonfinite=2, synthetic_size=24))
    assert result.summary["updates"] == 4  # 6 batches, 2 skipped
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    monkeypatch.setattr(build, "build_loss", loss_with_a_nan)
    from timm_ortho.train.guards import Diverged

    with pytest.raises(Diverged, match="2 updates in a row"):
        train(tiny(tmp_path, experiment="strict", skip_nonfinite=1, synthetic_size=24))


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
def compiled_and_eager(tmp_path: Path, backend: str, tiny) -> tuple[TrainResult, TrainResult]:
    # mode="clamp": the rule is continuous in the error's norm. With "match" (the default) a ratio that
    # sits on the band's edge is rescaled or not by a last-bit difference between inductor's fused
    # kernels and eager ones, and the two runs then part by more than rounding.
    common = dict(modulation={"mode": "clamp"}, synthetic_size=16, max_grad_ratio=None, precise_bn=0)
    eager = train(tiny(tmp_path, experiment="eager", **common))
    compiled = train(tiny(tmp_path, experiment="compiled", torchcompile=backend, **common))
    return eager, compiled


def assert_same_training(eager: TrainResult, compiled: TrainResult, rtol: float) -> None:
    losses = [[r["loss"] for r in records(res.run_dir) if r["type"] == "train"] for res in (eager, compiled)]
    assert len(losses[0]) == len(losses[1]) == 4
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=rtol, atol=0)
    ratios = [
        [r["mod_bottom_top_ratio"] for r in records(res.run_dir) if r["type"] == "train"]
        for res in (eager, compiled)
    ]
    torch.testing.assert_close(torch.tensor(ratios[1]), torch.tensor(ratios[0]), rtol=10 * rtol, atol=0)
    want, got = eager.model.state_dict(), compiled.model.state_dict()
    assert want.keys() == got.keys()  # the returned model is the eager module, not the compiled wrapper
    # Each tensor as a whole, after 4 updates: rounding differences of the forward grow through the
    # steps (most in small tensors that started at zero, like BN biases).
    for k, w in want.items():
        if w.is_floating_point():
            gap = torch.linalg.vector_norm(got[k] - w) / torch.linalg.vector_norm(w).clamp_min(1e-12)
            assert gap <= 100 * rtol, (k, float(gap))
    saved = torch.load(compiled.run_dir / "last.pth", weights_only=True)["state_dict"]
    assert saved.keys() == want.keys()  # timm-loadable under --torchcompile too


def test_torchcompile_trains_with_the_modulation_like_eager(tmp_path, tiny):
    # aot_eager: dynamo and AOT autograd trace the model and the modulation's traced rule without
    # inductor's code generation (fast); the slow test below runs inductor itself.
    assert_same_training(*compiled_and_eager(tmp_path, "aot_eager", tiny), rtol=1e-5)


@pytest.mark.slow
def test_torchcompile_inductor_trains_with_the_modulation_like_eager(tmp_path, tiny):
    assert_same_training(*compiled_and_eager(tmp_path, "inductor", tiny), rtol=1e-4)
