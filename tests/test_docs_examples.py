"""The trainer commands of docs/training.md and docs/timm.md, run as the docs give them, so that they
cannot drift from the code.

Every command that starts the trainer (``accelerate launch scripts/train_imagenet.py ...``,
``scripts/train_cifar.py``, ``timm-ortho-train``, ``python -m timm_ortho.train``), in a shell block
or inline, is read out of the docs: its launcher flags must be ``accelerate launch``'s and its flags
the trainer's, and the settings must pass ``validate_config``. The flows a new user follows are then
run in-process (``timm_ortho.train.loop.main(argv)`` in place of ``accelerate launch``) at a tiny
scale, on the data the docs name: ``/tmp/tiny`` written by docs/timm.md's own snippet, a tiny
ImageFolder for ImageNet and a tiny CIFAR-10 release for ``$D``. Only sizes change (batch 4, a few
images, no loader workers, 8 px, 2 updates where the docs train for hours), never a flag of the
method; paths are moved under the test's folder. A ``...`` in the docs stands for the flags a user
adds; here, those of a tiny run.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from timm_ortho.train.config import build_parser, config_from_args
from timm_ortho.train.loop import main
from timm_ortho.train.validation import validate_config

REPO = Path(__file__).resolve().parents[1]
DOCS = ("training.md", "timm.md")
_TRAINER = re.compile(r"scripts/train_(?:imagenet|cifar)\.py|timm-ortho-train|-m timm_ortho\.train\b")
_COMMAND_START = re.compile(r"(?:[A-Z_]+=\S*\s+)*(?:accelerate launch|python|timm-ortho-train)\b")

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@dataclass(frozen=True)
class Command:
    """One trainer command of the docs."""

    doc: str
    text: str
    """The command as the docs give it (continuations joined, variables expanded)."""
    launcher: tuple[str, ...]
    """``accelerate launch``'s own flags (empty without the launcher)."""
    target: str
    """The script or ``-m`` module the command starts."""
    preset: str
    args: tuple[str, ...]
    """The trainer's flags; ``...`` where the docs leave the rest to the reader."""

    def __str__(self) -> str:
        return f"{self.doc}: {self.text}"


def _command(doc: str, text: str) -> Command:
    # A placeholder such as <ip of rank 0> is one value to the shell.
    tokens = shlex.split(re.sub(r"<[^>]*>", "0", text), comments=True)
    while re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # CUDA_VISIBLE_DEVICES= ...
        tokens.pop(0)
    launcher: list[str] = []
    if tokens[:2] == ["accelerate", "launch"]:
        tokens = tokens[2:]
        while tokens and not _TRAINER.search(tokens[0]) and tokens[0] != "-m":
            launcher.append(tokens.pop(0))
    elif tokens[0] == "python":
        tokens.pop(0)
    if tokens[0] == "-m":
        tokens.pop(0)
    target, *args = tokens
    preset = "cifar" if target.endswith("train_cifar.py") else "imagenet"
    return Command(doc, text, tuple(launcher), target, preset, tuple(args))


def doc_commands(doc: str) -> list[Command]:
    """The trainer commands of ``docs/<doc>``, in order: shell blocks first, then inline ones."""
    text = (REPO / "docs" / doc).read_text()
    found = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            assignment = re.fullmatch(r"([A-Z_]+)=(\S+|\"[^\"]*\")\s*(#.*)?", line.strip())
            if assignment:  # D=~/data, P="..." as the shell would hold them
                variables[assignment[1]] = shlex.split(assignment[2])[0]
            elif _TRAINER.search(line):
                expanded = re.sub(r"\$(\w+)", lambda m, known=variables: known.get(m[1], m[0]), line.strip())
                found.append(_command(doc, expanded))
    for span in re.findall(r"`([^`\n]+)`", text):
        if _TRAINER.search(span) and _COMMAND_START.match(span):
            found.append(_command(doc, span))
    return found


COMMANDS = [c for doc in DOCS for c in doc_commands(doc)]


def find(doc: str, *needles: str) -> list[Command]:
    """The commands of ``doc`` holding every needle; failing here means the docs changed the flow."""
    found = [c for c in COMMANDS if c.doc == doc and all(n in c.text for n in needles)]
    assert found, f"no command of docs/{doc} holds {needles}: the docs changed, update this test with them"
    return found


def test_the_docs_hold_the_trainer_commands_this_test_knows():
    assert len(COMMANDS) >= 25
    assert {c.doc for c in COMMANDS} == set(DOCS)
    assert {c.preset for c in COMMANDS} == {"imagenet", "cifar"}


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.doc}:{i}" for i, c in enumerate(COMMANDS)])
def test_every_trainer_command_in_the_docs_parses(command):
    from accelerate.commands.launch import launch_command_parser

    if command.launcher or command.text.lstrip().startswith(("accelerate", "CUDA")):
        module = ["-m"] if command.target == "timm_ortho.train" else []
        launched = launch_command_parser().parse_args([*command.launcher, *module, command.target])
        assert launched.training_script == command.target
    args = [a for a in command.args if a != "..."]
    if args == ["--help"]:
        return  # test_training.py runs the command's --help
    cfg = config_from_args(build_parser(command.preset).parse_args(args))
    validate_config(cfg)


# ----------------------------------------------------------------------------------------------
# the flows, run
# ----------------------------------------------------------------------------------------------
TINY = ("--model", "plain_cnn20", "--img-size", "8", "--epochs", "1")
"""What a ``...`` stands for here: the flags of a tiny run."""
SCALE = ("--batch-size", "4", "--workers", "0", "--synthetic-size", "16", "--synthetic-val-size", "8")
"""Sizes only: what every command gets on top of its own flags (argparse: the last value wins)."""


def tiny_argv(command: Command, paths: dict[str, Path], *extra: str, img_size: int | None = 8) -> list[str]:
    """``command``'s flags at a tiny scale, the docs' paths moved to ``paths``."""
    args = []
    for token in command.args:
        if token == "...":
            args += TINY
            continue
        for doc_path, here in paths.items():
            token = str(here) + token[len(doc_path) :] if token.startswith(doc_path) else token
        args.append(token)
    return [*args, *SCALE, *(("--img-size", str(img_size)) if img_size else ()), *extra]


def launch_env(command: Command, monkeypatch) -> None:
    """The launcher's mixed precision, as ``accelerate launch`` hands it to the trainer (on a CPU:
    bf16 runs, fp16 needs a GPU and runs in float32 here)."""
    precision = dict(zip(command.launcher, command.launcher[1:], strict=False)).get("--mixed_precision", "no")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16" if precision == "bf16" else "no")


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    """``/tmp/tiny``, written by docs/timm.md's own snippet (into the test's folder)."""
    text = (REPO / "docs" / "timm.md").read_text()
    (snippet,) = re.findall(r"python - <<'EOF'\n(.*?)^EOF", text, flags=re.S | re.M)
    root = tmp_path / "tiny"
    exec(compile(snippet.replace("/tmp/tiny", str(root)), "docs/timm.md", "exec"), {})
    assert sorted(p.name for p in (root / "train").iterdir()) == ["cat", "dog"]
    return root


def test_quick_start(tmp_path, monkeypatch, caplog):
    """docs/training.md's first command: a run on the synthetic set, with the summary and the
    plots that the docs show it end with."""
    (command,) = find("training.md", "--synthetic-size 2560")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO"):
        assert main(tiny_argv(command, {}), preset=command.preset) == 0
    (run,) = (tmp_path / "output").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["synthetic"] and summary["updates"] == 8 and summary["epochs_done"] == 2
    assert "NO DATA DIRECTORY GIVEN" in caplog.text
    # The plots of the summary the docs print: every one of them, and no other.
    text = (REPO / "docs" / "training.md").read_text()
    shown = re.findall(r"^plot\s+\S+/(\S+\.png)$", text, flags=re.M)
    assert shown and sorted(Path(p).name for p in summary["plots"]) == sorted(shown)
    assert all((run / name).is_file() for name in shown)
    # and every line the docs show it with
    block = text.split("it ends with", 1)[1].split("```", 2)[1]
    headings = [line.split()[0] for line in block.splitlines() if line.strip() and line[0].isalpha()]
    (summary_text,) = [r.getMessage() for r in caplog.records if "\n=====" in r.getMessage()]
    assert [line.split()[0] for line in summary_text.splitlines() if line[:1].isalpha()] == headings


def test_continue_to_epoch_4(tmp_path, tiny_folder, monkeypatch, caplog):
    """docs/timm.md section 3: 2 cosine epochs, then the same command continued to epoch 4 from the
    run's last.pth. The continued epochs must train (lr > 0 after the resume, the weights move)."""
    from safetensors.torch import load_file

    first, resume = find("timm.md", "--data-dir /tmp/tiny")
    assert "--epochs 2" in first.text and "--epochs 4" in resume.text and "--resume" in resume.text
    paths = {"/tmp/tiny": tiny_folder, "/tmp/ours_out": tmp_path / "ours_out"}
    assert main(tiny_argv(first, paths, img_size=None), preset=first.preset) == 0
    run = tmp_path / "ours_out" / "run"
    at_8 = load_file(run / "checkpoints" / "ckpt-000000008" / "model.safetensors")
    with caplog.at_level("INFO"):
        assert main(tiny_argv(resume, paths, img_size=None), preset=resume.preset) == 0
    assert "4 epochs" in caplog.text and "schedule rebuilt" in caplog.text
    assert "top-5 is not reported: with 2 classes" in caplog.text
    # A train record closes every epoch (--log-interval is 50); the lr logged after update u is the
    # one of update u + 1. At 8 the first run's own schedule had ended (lr 0); from there on, the
    # cosine of 16 updates from 0.05.
    lrs = {r["step"]: r["lr"] for r in records(run) if r["type"] == "train"}
    assert sorted(lrs) == [4, 8, 12, 16] and lrs[8] == 0.0
    assert lrs[12] == pytest.approx(0.5 * 0.05 * (1 + math.cos(math.pi * 12 / 16)), rel=1e-9) and lrs[12] > 0
    at_16 = load_file(run / "checkpoints" / "ckpt-000000016" / "model.safetensors")
    assert not torch.equal(at_8["stem.conv.weight"], at_16["stem.conv.weight"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["updates"] == 16 and set(summary["final_eval"]) == {"loss", "top1"}


def test_resume_examples(tmp_path, monkeypatch):
    """docs/training.md's four ways to name what --resume continues, one after the other on one run:
    ``--resume auto`` starts it (nothing to resume yet) and is stopped early, as a preempted job
    would be; the run folder continues it to its end; its checkpoint folder and its last.pth then
    find it complete."""
    auto, by_folder, by_checkpoint, by_file = find("training.md", "--resume", "r34")
    monkeypatch.chdir(tmp_path)
    assert main(tiny_argv(auto, {}, "--max-steps", "2")) == 0
    assert main(tiny_argv(by_folder, {})) == 0
    run = tmp_path / "output" / "r34"
    newest = sorted((run / "checkpoints").iterdir())[-1].name
    assert newest == "ckpt-000000004"
    # The docs' checkpoint stands for one of their long run; here, the run's newest.
    named = Command(
        **{**vars(by_checkpoint), "args": tuple(re.sub(r"ckpt-\d+", newest, a) for a in by_checkpoint.args)}
    )
    assert main(tiny_argv(named, {})) == 0
    assert main(tiny_argv(by_file, {})) == 0
    resumed = [Path(r["from"]).name for r in records(run) if r["type"] == "resume"]
    assert resumed == ["ckpt-000000002", newest, newest]
    assert json.loads((run / "summary.json").read_text())["updates"] == 4


@pytest.fixture
def cifar_folder(tmp_path, write_cifar) -> Path:
    write_cifar(tmp_path / "cifar", per_batch=4)
    return tmp_path / "cifar"


@pytest.mark.parametrize("index", range(8))
def test_the_cifar_table_runs(index, tmp_path, cifar_folder, monkeypatch):
    """docs/training.md's runs of the paper's table (CIFAR-10 protocol): 2 updates each, on a tiny
    CIFAR-10 release where the docs have ``D=~/data``."""
    commands = find("training.md", "scripts/train_cifar.py --data-dir ~/data")
    assert len(commands) == 8
    command = commands[index]
    monkeypatch.chdir(tmp_path)
    assert main(tiny_argv(command, {"~/data": cifar_folder}, "--max-steps", "2"), preset="cifar") == 0
    (run,) = (tmp_path / "output").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["updates"] == 2 and "CIFAR-10" in summary["data"]


def _the_other_imagenet_commands() -> list[Command]:
    """The commands the flows above do not run (launching table, ImageNet runs, inline ones), once each."""
    ran = {c.text for c in (*find("training.md", "--synthetic-size 2560"), *find("training.md", "r34"))}
    others = [c for c in COMMANDS if c.preset == "imagenet" and "/tmp/tiny" not in c.text]
    unique = {c.text: c for c in others if c.text not in ran and c.args != ("--help",)}
    return list(unique.values())


@pytest.mark.slow
@pytest.mark.parametrize("command", _the_other_imagenet_commands(), ids=str)
def test_every_other_imagenet_command_runs_at_a_tiny_scale(
    command, tmp_path, write_image_folder, monkeypatch
):
    """In one process on the CPU, 2 updates each, on a tiny ImageFolder where the docs have
    /data/imagenet (the processes of a launch: test_training.py runs two on a CPU)."""
    data = write_image_folder(tmp_path / "imagenet", per_class=4, size=36)
    launch_env(command, monkeypatch)
    monkeypatch.chdir(tmp_path)
    argv = tiny_argv(command, {"/data/imagenet": data}, "--max-steps", "2", img_size=32)
    assert main(argv, preset=command.preset) == 0
    (run,) = (tmp_path / "output").iterdir()
    assert json.loads((run / "summary.json").read_text())["updates"] == 2
