"""Every setting of a training run, declared once.

:class:`TrainConfig` is the single source: each field carries its command-line flag in its metadata
(help, aliases, a number's range, argparse extras: ``Annotated[type, cli(...)]``), its type hint gives
the argparse type, ``nargs`` and choices, and its default is the imagenet preset's (``CIFAR_PROTOCOL``
overrides some for the cifar preset). The data settings are
:class:`~timm_ortho.train.data.DataConfig`'s fields, inherited. :func:`build_parser` generates the
options from the fields (:mod:`timm_ortho.train.flags` says how), :func:`config_from_args` maps them
back by name and :func:`~timm_ortho.train.validation.validate_config` checks the ranges and choices
they declare, so adding a setting is adding one field.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from timm.utils import ParseKwargs

from ..defaults import DEFAULT_MAX_GRAD_RATIO, DEFAULT_MODULATION, DEFAULT_ORTHO_DECAY
from ..factory import ORTHO_PREFIX
from .data import DataConfig
from .flags import MODULATION_ALIASES, ModulationAction, cli, flag_of, from_hint, number_or_auto

__all__ = [
    "CIFAR_PROTOCOL",
    "DEFAULT_PRECISE_BN_BATCHES",
    "SCHEDULERS",
    "ConfigError",
    "Preset",
    "TrainConfig",
    "base_optimizer_name",
    "build_parser",
    "config_from_args",
    "field_specs",
]

Preset = Literal["imagenet", "cifar"]

DEFAULT_PRECISE_BN_BATCHES = 100
"""Precise-BN batches for plain nets: enough for stable averages (fvcore uses 200), cheap next to an epoch."""


class ConfigError(ValueError):
    """Flags that contradict each other or are out of range."""


# The command-line side of the data settings, which DataConfig declares (TrainConfig inherits them).
_DATA_CLI = {
    "data_dir": cli(
        "ImageFolder root (train/, val/) or CIFAR-10 pickle directory; omitted: the embedded synthetic set",
        group="data",
    ),
    "num_classes": cli("checked against the data; None with the synthetic set: 10 classes", ge=2),
    "synthetic_size": cli("synthetic training images", ge=1),
    "synthetic_val_size": cli(ge=1),
    "augment": cli(
        "timm: random resized crop etc.; cifar: pad-4 crop + flip; none",
        aliases={"--no-aug": dict(const="none", help="same as --augment none")},
    ),
    "aa": cli("auto-augment policy, e.g. rand-m9-mstd0.5-inc1"),
    "reprob": cli("random erasing probability", ge=0, le=1),
    "hflip": cli(ge=0, le=1),
    "color_jitter": cli(ge=0),
    "scale": cli(metavar=("MIN", "MAX")),
    "ratio": cli(metavar=("MIN", "MAX")),
    "strict_data": cli(
        "stop at the first image that cannot be decoded (otherwise it is replaced by the next one, "
        "counted and reported in the summary)"
    ),
}


@dataclass
class TrainConfig(DataConfig):
    """All settings of a run; every field is a flag of the training scripts (``--help``).

    The data settings are :class:`~timm_ortho.train.data.DataConfig`'s own fields, inherited.
    """

    img_size: Annotated[int | None, cli("None: the model's input size", ge=4)] = None
    workers: Annotated[int, cli(flags=["-j"], ge=0)] = 4
    pin_memory: Annotated[
        bool | None, cli("pinned host memory (None: on when training on CUDA)", flags=["--pin-mem"])
    ] = None

    # model and method
    model: Annotated[str, cli(group="model and method")] = "plain_cnn44_imagenet"
    model_kwargs: Annotated[dict[str, Any], cli(nargs="*", action=ParseKwargs, metavar="KEY=VALUE")] = field(
        default_factory=dict
    )
    drop: Annotated[float | None, cli("dropout before the classifier", ge=0, le=1)] = None
    drop_path: Annotated[float | None, cli(ge=0, le=1)] = None
    init: Annotated[
        Literal["orthonormal", "msra"] | None, cli("None: orthonormal, or msra with --baseline")
    ] = None
    baseline: Annotated[bool, cli("MSRA init + L2 weight decay, no orthonormality term, no modulation")] = (
        False
    )
    ortho_decay: Annotated[
        float, cli("lambda of the orthonormality regularizer (replaces L2 on conv/linear weights)", ge=0)
    ] = DEFAULT_ORTHO_DECAY
    ortho_form: Literal["auto", "coupled", "decoupled"] = "auto"
    max_grad_ratio: Annotated[
        float | Literal["auto"] | None,
        cli(
            "step bound: every regularized weight's gradient is scaled so that |grad| <= RATIO |W| "
            "(per layer, inside the optimizer step); auto: 1/L on a plain chain of L regularized layers, "
            "none on other models; 0 turns it off",
            type=number_or_auto,
            metavar="RATIO",
            ge=0,
        ),
    ] = DEFAULT_MAX_GRAD_RATIO
    bound_momentum: Annotated[
        float | None,
        cli(
            "hold the step bound to a running average of the gradients with this coefficient (e.g. "
            "0.9) instead of each batch's: for small batches at a small lr, not at lr 0.1 "
            "(docs/optimizer.md)",
            metavar="BETA",
            gt=0,
            lt=1,
        ),
    ] = None
    ortho_exclude: Annotated[
        list[str] | None, cli("fnmatch patterns of weights left to --weight-decay", metavar="PATTERN")
    ] = None
    modulation: Annotated[
        bool | str | dict[str, Any],
        cli(
            "backward error modulation: not given, auto (on for plain chains, off for other models); "
            "alone or 'top', the library's rule; 'paper', the paper's consecutive rule; with KEY=VALUE "
            "pairs (band, mode, statistic, include_classifier, max_scale, reference, schedule), "
            "ErrorModulation with those",
            flags=["--modulation", "--no-modulation"],
            action=ModulationAction,
            nargs="*",
            metavar="KEY=VALUE",
            aliases=MODULATION_ALIASES,
        ),
    ] = DEFAULT_MODULATION
    """As :func:`timm_ortho.create_optimizer` takes it: "auto", False, True, a preset name or a dict of
    ErrorModulation options."""
    precise_bn: Annotated[
        int | None,
        cli(
            f"recompute BN statistics over N training batches before each evaluation; when not given: "
            f"{DEFAULT_PRECISE_BN_BATCHES} for plain nets, 0 (off) for other models",
            metavar="N",
        ),
    ] = None
    error_stats: Annotated[
        bool, cli("without modulation, still record the per-layer error moments (measure-only hooks)")
    ] = True

    # optimizer and schedule
    opt: Annotated[
        str,
        cli(
            "timm optimizer name (momentum = SGD without Nesterov); ortho_<name>, the name timm's "
            "train.py takes under timm_ortho's runner, is the same as <name> here: the trainer applies "
            "the method itself",
            group="optimizer and schedule",
        ),
    ] = "momentum"
    lr: Annotated[float | None, cli("learning rate; None: --lr-base scaled by the global batch", ge=0)] = None
    lr_base: Annotated[float, cli(gt=0)] = 0.1
    lr_base_size: Annotated[int, cli(ge=1)] = 256
    lr_base_scale: Literal["linear", "sqrt"] = "linear"
    momentum: Annotated[float, cli(ge=0)] = 0.9
    weight_decay: Annotated[
        float, cli("L2 for --baseline; otherwise only for weights outside the regularizer", ge=0)
    ] = 1e-4
    opt_eps: Annotated[float | None, cli(gt=0)] = None
    clip_grad: Annotated[float | None, cli(gt=0)] = None
    clip_mode: Literal["norm", "value"] = "norm"
    sched: Annotated[str, cli("timm scheduler: cosine, step, multistep, poly, none, ...")] = "multistep"
    epochs: int = 90
    iterations: Annotated[int | None, cli("length in updates (overrides --epochs)", ge=1)] = None
    decay_milestones: Annotated[list[float], cli("multistep milestones in epochs", ge=0)] = field(
        default_factory=lambda: [30.0, 60.0]
    )
    decay_steps: Annotated[
        list[int] | None, cli("multistep milestones in updates (overrides --decay-milestones)", ge=0)
    ] = None
    decay_epochs: Annotated[float, cli("step scheduler interval", gt=0)] = 90.0
    decay_rate: Annotated[float, cli(gt=0)] = 0.1
    warmup_epochs: Annotated[float, cli(ge=0)] = 0.0
    warmup_steps: Annotated[int | None, cli("overrides --warmup-epochs", ge=0)] = None
    warmup_lr: Annotated[float, cli(ge=0)] = 1e-5
    min_lr: Annotated[float, cli(ge=0)] = 0.0

    # training
    batch_size: Annotated[int, cli("per process", flags=["-b"], group="training", ge=1)] = 128
    validation_batch_size: Annotated[int | None, cli("None: --batch-size", flags=["-vb"], ge=1)] = None
    grad_accum_steps: Annotated[int, cli(ge=1)] = 1
    amp: Annotated[
        bool,
        cli("mixed precision in --amp-dtype (as timm); without it, accelerate launch's --mixed_precision"),
    ] = False
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    channels_last: bool = False
    sync_bn: Annotated[bool, cli("SyncBatchNorm across processes (timm converter)")] = False
    torchcompile: Annotated[str | None, cli(nargs="?", const="inductor", metavar="BACKEND")] = None
    model_ema: Annotated[bool, cli("keep an EMA of the weights (timm ModelEmaV3)")] = False
    model_ema_decay: Annotated[float, cli(ge=0, le=1)] = 0.9998
    model_ema_warmup: bool = False
    mixup: Annotated[float, cli(ge=0)] = 0.0
    cutmix: Annotated[float, cli(ge=0)] = 0.0
    mixup_prob: Annotated[float, cli(ge=0, le=1)] = 1.0
    mixup_switch_prob: Annotated[float, cli(ge=0, le=1)] = 0.5
    mixup_mode: str = "batch"
    mixup_off_epoch: Annotated[int, cli(ge=0)] = 0
    smoothing: Annotated[float, cli(ge=0, le=1)] = 0.0
    max_steps: Annotated[int | None, cli("stop after N updates", ge=1)] = None
    """Stop after this many updates (the schedule is unchanged); for tests and quick runs."""

    # output
    output: Annotated[str, cli(group="output")] = "./output"
    experiment: Annotated[str | None, cli("run folder name under --output")] = None
    resume: Annotated[
        str | None,
        cli(
            "checkpoint folder, a file in one (or a run's last.pth, as timm's --resume FILE), run folder, "
            "or 'auto' (newest of --experiment; none yet: start fresh)"
        ),
    ] = None
    checkpoint_interval: Annotated[int, cli("also checkpoint every N updates", ge=0)] = 0
    checkpoint_hist: Annotated[int, cli("checkpoints kept", ge=1)] = 2
    log_interval: Annotated[int, cli("updates between log records", ge=1)] = 50
    skip_nonfinite: Annotated[
        int,
        cli(
            "skip an update whose loss is NaN or infinite, up to N in a row, instead of stopping at the "
            "first (costs one host-device synchronization per update)",
            ge=0,
        ),
    ] = 0
    log_with: Annotated[
        list[str] | None,
        cli(
            "accelerate trackers, e.g. tensorboard",
            action="extend",
            aliases={
                "--log-wandb": dict(
                    action="append_const", const="wandb", help="same as --log-with wandb (timm's flag)"
                )
            },
        ),
    ] = None

    def data_config(self, img_size: int) -> DataConfig:
        """The :class:`DataConfig` part of this configuration, at ``img_size``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(DataConfig)}
        return DataConfig(**{**values, "img_size": img_size})

    def modulation_setting(self) -> bool | str | dict[str, Any]:
        """``modulation`` as :func:`timm_ortho.create_optimizer` takes it (``schedule=0``: always)."""
        if not isinstance(self.modulation, dict):
            return self.modulation
        options = dict(self.modulation)
        if not options.get("schedule"):  # 0 means always, as ErrorModulation's None
            options.pop("schedule", None)
        return options


CIFAR_PROTOCOL: dict[str, Any] = {
    # The paper follows He et al.: 64k iterations at batch 128, lr 0.1 divided by 10 at 32k and 48k.
    # The defaults are the rest of it: batch 128, SGD momentum 0.9, weight decay 1e-4, multistep by 0.1,
    # no warmup, no label smoothing (test_cifar_defaults_are_the_papers_protocol holds them).
    "model": "plain_cnn44",
    "lr": 0.1,
    "iterations": 64000,
    "decay_steps": [32000, 48000],
    "augment": "none",
    "img_size": 32,
    "synthetic_size": 50000,
    "synthetic_val_size": 10000,
    "workers": 2,
    "log_interval": 100,
}


# ----------------------------------------------------------------------------------------------
# the parser, generated from the fields
# ----------------------------------------------------------------------------------------------
def field_specs() -> typing.Iterator[tuple[str, Any, dict[str, Any]]]:
    """``(name, type hint, cli spec)`` of every :class:`TrainConfig` field, in declaration order."""
    hints = typing.get_type_hints(TrainConfig, include_extras=True)
    for f in dataclasses.fields(TrainConfig):
        hint, spec = hints[f.name], _DATA_CLI.get(f.name, cli())
        if typing.get_origin(hint) is Annotated:
            hint, spec = hint.__origin__, hint.__metadata__[0]
        yield f.name, hint, spec


def build_parser(preset: Preset = "imagenet", prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of the training scripts, named like timm's ``train.py`` where the concept is the same.

    ``preset="cifar"`` sets the defaults to the paper's CIFAR-10 protocol (He et al.'s schedule);
    ``prog`` names the command in ``--help`` (default: argparse's, the script's file name).
    """
    if preset not in ("imagenet", "cifar"):
        raise ValueError(f"unknown preset {preset!r}")
    defaults = {**dataclasses.asdict(TrainConfig()), **(CIFAR_PROTOCOL if preset == "cifar" else {})}
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train a timm model with orthonormality regularization and backward error modulation "
            "(or, with --baseline, MSRA init + L2 weight decay). Launch with `accelerate launch`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    group = None
    for name, hint, spec in field_specs():
        if spec["group"] or group is None:
            group = parser.add_argument_group(spec["group"])
        meta = {k: v for k, v in spec.items() if k not in ("group", "bounds")}
        # A long flag in ``flags`` replaces the one derived from the name (--pin-mem for pin_memory).
        extra, aliases = meta.pop("flags", []), meta.pop("aliases", {})
        long = [] if any(x.startswith("--") for x in extra) else [flag_of(name)]
        group.add_argument(*long, *extra, dest=name, default=defaults[name], **{**from_hint(hint), **meta})
        for alias, kwargs in aliases.items():  # an alias shows no default: the flag it stands for does
            group.add_argument(
                alias, dest=name, default=argparse.SUPPRESS, **{"action": "store_const", **kwargs}
            )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from parsed flags (unknown attributes are an error)."""
    values = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    for key in ("scale", "ratio", "mean", "std"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    return TrainConfig(**values)


SCHEDULERS = ("cosine", "tanh", "step", "constant", "multistep", "plateau", "poly", "wsd", "rsqrt", "none")
"""The ``sched`` names of ``timm.scheduler.create_scheduler_v2`` (timm has no registry to list them)."""


def base_optimizer_name(opt: str) -> str:
    """``--opt`` as the trainer builds it: lower case, ``ortho_<name>`` read as ``<name>``.

    ``ortho_<name>`` is how timm's ``train.py`` selects the method under timm_ortho's runner; the
    trainer applies the method itself (and with ``--baseline`` not at all), so here the prefix
    adds nothing, and ``--opt ortho_sgd`` and ``--opt sgd`` are one optimizer and one recipe.
    """
    name = opt.lower()
    return name[len(ORTHO_PREFIX) :] if name.startswith(ORTHO_PREFIX) else name
