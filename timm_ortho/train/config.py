"""Every setting of a training run, declared once.

:class:`TrainConfig` is the single source: each field carries its command-line flag in its metadata
(help, aliases, argparse extras: ``Annotated[type, cli(...)]``), its type hint gives the argparse
type, ``nargs`` and choices, and its default is the imagenet preset's (``CIFAR_PROTOCOL`` overrides
some for the cifar preset). The data settings are :class:`~timm_ortho.train.data.DataConfig`'s fields,
inherited. :func:`build_parser` generates the options from the fields and :func:`config_from_args`
maps them back by name, so adding a setting is adding one field.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from timm.utils import ParseKwargs

from ..defaults import DEFAULT_MAX_GRAD_RATIO, DEFAULT_ORTHO_DECAY
from .data import DataConfig

__all__ = [
    "CIFAR_PROTOCOL",
    "DEFAULT_PRECISE_BN_BATCHES",
    "SCHEDULERS",
    "ConfigError",
    "Preset",
    "TrainConfig",
    "build_parser",
    "check_model_arguments",
    "config_from_args",
    "validate_config",
]

Preset = Literal["imagenet", "cifar"]

DEFAULT_PRECISE_BN_BATCHES = 100
"""Precise-BN batches for plain nets: enough for stable averages (fvcore uses 200), cheap next to an epoch."""


class ConfigError(ValueError):
    """Flags that contradict each other or are out of range."""


def cli(help: str | None = None, *, group: str | None = None, **argparse_kwargs: Any) -> dict[str, Any]:
    """The command-line side of a :class:`TrainConfig` field, as ``Annotated[type, cli(...)]``.

    ``group`` opens a new argparse group at this field; ``flags`` adds short or timm-style spellings
    (a long one replaces the flag derived from the name); ``aliases`` maps extra flags to the argparse
    keywords that make them write into this field; the other keywords go to ``add_argument`` over
    what the type hint implies. A field without it gets a flag from its name and type alone.
    """
    return {"help": help, "group": group, **argparse_kwargs}


class _ModulationAction(ParseKwargs):
    """``--modulation [KEY=VALUE ...]``: on, with the pairs (if any) as ErrorModulation options.

    Options given before it by the ``--mod-*`` aliases are kept; ``--no-modulation`` turns it off.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "--no-modulation":
            setattr(namespace, self.dest, False)
            return
        super().__call__(parser, namespace, values, option_string)
        options = {**getattr(namespace, "_mod_options", {}), **getattr(namespace, self.dest)}
        setattr(namespace, self.dest, options or True)


class _ModulationOption(argparse.Action):
    """A ``--mod-*`` alias: sets one ErrorModulation option, used once ``--modulation`` is on."""

    def __init__(self, *args: Any, key: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key = key

    def __call__(self, parser, namespace, values, option_string=None):
        pending = {
            **getattr(namespace, "_mod_options", {}),
            self.key: self.const if self.nargs == 0 else values,
        }
        namespace._mod_options = pending
        current = getattr(namespace, self.dest)
        if current is not False:  # --modulation came first
            setattr(namespace, self.dest, {**(current if isinstance(current, dict) else {}), **pending})


def _mod_alias(key: str, help: str = "ErrorModulation's option", **argparse_kwargs: Any) -> dict[str, Any]:
    return dict(
        action=_ModulationOption, key=key, help=f"same as --modulation {key}=...; {help}", **argparse_kwargs
    )


_MODULATION_ALIASES = {
    # The ErrorModulation options as their own flags; each sets one key of --modulation's dict.
    "--mod-band": _mod_alias("band", "quasi-isometry constant A >= 1", type=float, metavar="A"),
    "--mod-mode": _mod_alias("mode", choices=["clamp", "match"]),
    "--mod-statistic": _mod_alias("statistic", choices=["total", "mean"]),
    "--mod-include-classifier": _mod_alias("include_classifier", nargs=0, const=True),
    "--no-mod-include-classifier": _mod_alias("include_classifier", nargs=0, const=False),
    "--mod-max-scale": _mod_alias("max_scale", type=float, metavar="S"),
    "--mod-reference": _mod_alias("reference", choices=["previous", "top"]),
    "--mod-schedule": _mod_alias(
        "schedule", "modulate during the first N updates only (0: always)", type=int, metavar="N"
    ),
}


# The command-line side of the data settings, which DataConfig declares (TrainConfig inherits them).
_DATA_CLI = {
    "data_dir": cli(
        "ImageFolder root (train/, val/) or CIFAR-10 pickle directory; omitted: the embedded synthetic set",
        group="data",
    ),
    "num_classes": cli("checked against the data; None with the synthetic set: 10 classes"),
    "synthetic_size": cli("synthetic training images"),
    "augment": cli(
        "timm: random resized crop etc.; cifar: pad-4 crop + flip; none",
        aliases={"--no-aug": dict(const="none", help="same as --augment none")},
    ),
    "aa": cli("auto-augment policy, e.g. rand-m9-mstd0.5-inc1"),
    "reprob": cli("random erasing probability"),
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

    img_size: Annotated[int | None, cli("None: the model's input size")] = None
    workers: Annotated[int, cli(flags=["-j"])] = 4
    pin_memory: Annotated[
        bool | None, cli("pinned host memory (None: on when training on CUDA)", flags=["--pin-mem"])
    ] = None

    # model and method
    model: Annotated[str, cli(group="model and method")] = "plain_cnn44_imagenet"
    model_kwargs: Annotated[dict[str, Any], cli(nargs="*", action=ParseKwargs, metavar="KEY=VALUE")] = field(
        default_factory=dict
    )
    drop: Annotated[float | None, cli("dropout before the classifier")] = None
    drop_path: float | None = None
    init: Annotated[
        Literal["orthonormal", "msra"] | None, cli("None: orthonormal, or msra with --baseline")
    ] = None
    baseline: Annotated[bool, cli("MSRA init + L2 weight decay, no orthonormality term, no modulation")] = (
        False
    )
    ortho_decay: Annotated[
        float, cli("lambda of the orthonormality regularizer (replaces L2 on conv/linear weights)")
    ] = DEFAULT_ORTHO_DECAY
    ortho_form: Literal["auto", "coupled", "decoupled"] = "auto"
    max_grad_ratio: Annotated[
        float | None,
        cli(
            "step bound: every regularized weight's gradient is scaled so that |grad| <= RATIO |W| "
            "(per layer, inside the optimizer step); 0 turns it off"
        ),
    ] = DEFAULT_MAX_GRAD_RATIO
    ortho_exclude: Annotated[
        list[str] | None, cli("fnmatch patterns of weights left to --weight-decay", metavar="PATTERN")
    ] = None
    modulation: Annotated[
        bool | dict[str, Any],
        cli(
            "backward error modulation: alone, with ErrorModulation's own options; with KEY=VALUE pairs "
            "(band, mode, statistic, include_classifier, max_scale, reference, schedule), with those",
            flags=["--modulation", "--no-modulation"],
            action=_ModulationAction,
            nargs="*",
            metavar="KEY=VALUE",
            aliases=_MODULATION_ALIASES,
        ),
    ] = False
    """As :func:`timm_ortho.create_optimizer` takes it: False, True or a dict of ErrorModulation options."""
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
        str, cli("timm optimizer name (momentum = SGD without Nesterov)", group="optimizer and schedule")
    ] = "momentum"
    lr: Annotated[float | None, cli("learning rate; None: --lr-base scaled by the global batch")] = None
    lr_base: float = 0.1
    lr_base_size: int = 256
    lr_base_scale: Literal["linear", "sqrt"] = "linear"
    momentum: float = 0.9
    weight_decay: Annotated[
        float, cli("L2 for --baseline; otherwise only for weights outside the regularizer")
    ] = 1e-4
    opt_eps: float | None = None
    clip_grad: float | None = None
    clip_mode: Literal["norm", "value"] = "norm"
    sched: Annotated[str, cli("timm scheduler: cosine, step, multistep, poly, none, ...")] = "multistep"
    epochs: int = 90
    iterations: Annotated[int | None, cli("length in updates (overrides --epochs)")] = None
    decay_milestones: Annotated[list[float], cli("multistep milestones in epochs")] = field(
        default_factory=lambda: [30.0, 60.0]
    )
    decay_steps: Annotated[
        list[int] | None, cli("multistep milestones in updates (overrides --decay-milestones)")
    ] = None
    decay_epochs: Annotated[float, cli("step scheduler interval")] = 90.0
    decay_rate: float = 0.1
    warmup_epochs: float = 0.0
    warmup_steps: Annotated[int | None, cli("overrides --warmup-epochs")] = None
    warmup_lr: float = 1e-5
    min_lr: float = 0.0

    # training
    batch_size: Annotated[int, cli("per process", flags=["-b"], group="training")] = 128
    validation_batch_size: Annotated[int | None, cli("None: --batch-size", flags=["-vb"])] = None
    grad_accum_steps: int = 1
    amp: Annotated[
        bool,
        cli("mixed precision in --amp-dtype (as timm); without it, accelerate launch's --mixed_precision"),
    ] = False
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    channels_last: bool = False
    sync_bn: Annotated[bool, cli("SyncBatchNorm across processes (timm converter)")] = False
    torchcompile: Annotated[str | None, cli(nargs="?", const="inductor", metavar="BACKEND")] = None
    model_ema: Annotated[bool, cli("keep an EMA of the weights (timm ModelEmaV3)")] = False
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    mixup_off_epoch: int = 0
    smoothing: float = 0.0
    max_steps: Annotated[int | None, cli("stop after N updates")] = None
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
    checkpoint_interval: Annotated[int, cli("also checkpoint every N updates")] = 0
    checkpoint_hist: Annotated[int, cli("checkpoints kept")] = 2
    log_interval: Annotated[int, cli("updates between log records")] = 50
    skip_nonfinite: Annotated[
        int,
        cli(
            "skip an update whose loss is NaN or infinite, up to N in a row, instead of stopping at the "
            "first (costs one host-device synchronization per update)"
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

    def modulation_options(self) -> dict[str, Any] | None:
        """The ErrorModulation options when modulation is on (``{}``: its defaults), else ``None``."""
        if self.modulation is False:
            return None
        options = dict(self.modulation) if isinstance(self.modulation, dict) else {}
        if not options.get("schedule"):  # 0 means always, as ErrorModulation's None
            options.pop("schedule", None)
        return options


CIFAR_PROTOCOL: dict[str, Any] = {
    # The paper follows He et al.: 64k iterations at batch 128, lr 0.1 divided by 10 at 32k and 48k.
    "model": "plain_cnn44",
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "opt": "momentum",
    "sched": "multistep",
    "iterations": 64000,
    "decay_steps": [32000, 48000],
    "decay_rate": 0.1,
    "warmup_epochs": 0.0,
    "smoothing": 0.0,
    "augment": "none",
    "img_size": 32,
    "dataset": "auto",
    "synthetic_size": 50000,
    "synthetic_val_size": 10000,
    "workers": 2,
    "log_interval": 100,
}


# ----------------------------------------------------------------------------------------------
# the parser, generated from the fields
# ----------------------------------------------------------------------------------------------
def _from_hint(hint: Any) -> dict[str, Any]:
    """argparse keywords implied by a field's type hint (``X | None`` reads as ``X``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kept = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(kept) > 1:
            return {}
        hint = kept[0]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return {"choices": list(args)}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is list:
        return {"type": args[0], "nargs": "+"}
    if origin is tuple:
        return {"type": args[0], "nargs": len(args)}
    return {"type": hint} if hint in (int, float) else {}


def _add_field(
    group: argparse._ArgumentGroup, name: str, hint: Any, spec: dict[str, Any], default: Any
) -> None:
    meta = {k: v for k, v in spec.items() if k != "group"}
    # A long flag in ``flags`` replaces the one derived from the name (--pin-mem for pin_memory).
    extra, aliases = meta.pop("flags", []), meta.pop("aliases", {})
    long = [] if any(x.startswith("--") for x in extra) else [f"--{name.replace('_', '-')}"]
    group.add_argument(*long, *extra, dest=name, default=default, **{**_from_hint(hint), **meta})
    for alias, kwargs in aliases.items():  # an alias shows no default: the flag it stands for does
        group.add_argument(alias, dest=name, default=argparse.SUPPRESS, **{"action": "store_const", **kwargs})


def build_parser(preset: Preset = "imagenet") -> argparse.ArgumentParser:
    """The flags of the training scripts, named like timm's ``train.py`` where the concept is the same.

    ``preset="cifar"`` sets the defaults to the paper's CIFAR-10 protocol (He et al.'s schedule).
    """
    if preset not in ("imagenet", "cifar"):
        raise ValueError(f"unknown preset {preset!r}")
    defaults = {**dataclasses.asdict(TrainConfig()), **(CIFAR_PROTOCOL if preset == "cifar" else {})}
    hints = typing.get_type_hints(TrainConfig, include_extras=True)
    parser = argparse.ArgumentParser(
        description=(
            "Train a timm model with orthonormality regularization and backward error modulation "
            "(or, with --baseline, MSRA init + L2 weight decay). Launch with `accelerate launch`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    group = None
    for f in dataclasses.fields(TrainConfig):
        hint, spec = hints[f.name], _DATA_CLI.get(f.name, cli())
        if typing.get_origin(hint) is Annotated:
            hint, spec = hint.__origin__, hint.__metadata__[0]
        if spec["group"] or group is None:
            group = parser.add_argument_group(spec["group"])
        _add_field(group, f.name, hint, spec, defaults[f.name])
    for action in parser._actions:
        # ArgumentDefaultsHelpFormatter appends "(default: ...)" only to options that have a help text.
        if action.help is None and action.default is not argparse.SUPPRESS:
            action.help = "(default: %(default)s)"
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from parsed flags (unknown attributes are an error)."""
    values = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    for key in ("scale", "ratio", "mean", "std"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    return TrainConfig(**values)


# Settings that must be finite numbers, with the range each one takes: (low, high, low_inclusive).
# A value outside it would be accepted by argparse ("nan", "-1") and fail late, or worse, train.
_RANGES: dict[str, tuple[float, float, bool]] = {
    "lr": (0.0, math.inf, True),
    "lr_base": (0.0, math.inf, False),
    "momentum": (0.0, math.inf, True),
    "weight_decay": (0.0, math.inf, True),
    "ortho_decay": (0.0, math.inf, True),
    "opt_eps": (0.0, math.inf, False),
    "clip_grad": (0.0, math.inf, False),
    "decay_epochs": (0.0, math.inf, False),
    "decay_rate": (0.0, math.inf, False),
    "warmup_epochs": (0.0, math.inf, True),
    "warmup_lr": (0.0, math.inf, True),
    "min_lr": (0.0, math.inf, True),
    "drop": (0.0, 1.0, True),
    "drop_path": (0.0, 1.0, True),
    "model_ema_decay": (0.0, 1.0, True),
    "mixup": (0.0, math.inf, True),
    "cutmix": (0.0, math.inf, True),
    "mixup_prob": (0.0, 1.0, True),
    "mixup_switch_prob": (0.0, 1.0, True),
    "smoothing": (0.0, 1.0, True),
    "reprob": (0.0, 1.0, True),
    "hflip": (0.0, 1.0, True),
    "color_jitter": (0.0, math.inf, True),
}
# Counts and their least value; ``None`` (where a field allows it) means "not given".
_AT_LEAST = {
    "skip_nonfinite": 0,
    "batch_size": 1,
    "validation_batch_size": 1,
    "grad_accum_steps": 1,
    "log_interval": 1,
    "checkpoint_hist": 1,
    "max_steps": 1,
    "iterations": 1,
    "lr_base_size": 1,
    "synthetic_size": 1,
    "synthetic_val_size": 1,
    "img_size": 4,
    "workers": 0,
    "checkpoint_interval": 0,
    "warmup_steps": 0,
    "mixup_off_epoch": 0,
    "num_classes": 2,
}
SCHEDULERS = ("cosine", "tanh", "step", "constant", "multistep", "plateau", "poly", "wsd", "rsqrt", "none")
"""The ``sched`` names of ``timm.scheduler.create_scheduler_v2`` (timm has no registry to list them)."""


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _did_you_mean(name: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _check_numbers(cfg: TrainConfig) -> None:
    """Every numeric setting finite and in its range (argparse lets ``nan``, ``inf`` and ``-1`` through)."""
    for name, (low, high, inclusive) in _RANGES.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        below = value < low if inclusive else value <= low
        if not isinstance(value, (int, float)) or not math.isfinite(value) or below or value > high:
            side = ">=" if inclusive else ">"
            upper = "" if high == math.inf else f" and <= {high:g}"
            raise ConfigError(f"{_flag(name)} must be a finite number {side} {low:g}{upper}, got {value}")
    for name, least in _AT_LEAST.items():
        value = getattr(cfg, name)
        if value is not None and value < least:
            raise ConfigError(f"{_flag(name)} must be at least {least}, got {value}")
    if cfg.max_grad_ratio is not None and not 0 <= cfg.max_grad_ratio < math.inf:
        raise ConfigError(f"--max-grad-ratio must be a finite number >= 0 (0: off), got {cfg.max_grad_ratio}")
    if cfg.precise_bn is not None and cfg.precise_bn < 0:
        raise ConfigError(f"--precise-bn takes a number of batches >= 0 (0: off), got {cfg.precise_bn}")
    if cfg.epochs < 1 and cfg.iterations is None:
        raise ConfigError(f"--epochs must be positive, got {cfg.epochs}")
    if any(not math.isfinite(m) or m < 0 for m in cfg.decay_milestones):
        raise ConfigError(f"--decay-milestones must be finite epochs >= 0, got {cfg.decay_milestones}")
    if any(m < 0 for m in cfg.decay_steps or ()):
        raise ConfigError(f"--decay-steps must be updates >= 0, got {cfg.decay_steps}")


def _check_names(cfg: TrainConfig) -> None:
    """The model, optimizer and scheduler exist in timm's registries (close names suggested)."""
    import timm
    from timm.models import split_model_name_tag
    from timm.optim import list_optimizers

    arch = split_model_name_tag(cfg.model)[0]
    if not timm.is_model(arch):
        raise ConfigError(
            f"--model {cfg.model}: timm knows no such model{_did_you_mean(arch, timm.list_models())}"
        )
    # timm reads "lookahead_<name>" as <name> wrapped in Lookahead, and only that prefix.
    *prefix, opt = cfg.opt.lower().split("_")
    if prefix not in ([], ["lookahead"]) or opt not in list_optimizers():
        raise ConfigError(
            f"--opt {cfg.opt}: timm has no such optimizer{_did_you_mean(cfg.opt.lower(), list_optimizers())} "
            "(timm.optim.list_optimizers() lists them; lookahead_<name> wraps one in Lookahead)"
        )
    if cfg.sched not in SCHEDULERS:
        raise ConfigError(
            f"--sched {cfg.sched}: timm has no such scheduler{_did_you_mean(cfg.sched, SCHEDULERS)} "
            f"(one of {', '.join(SCHEDULERS)})"
        )


def check_model_arguments(cfg: TrainConfig) -> None:
    """The regularization flags fit the model (a :class:`ConfigError` otherwise)."""
    from timm.models import model_entrypoint, split_model_name_tag

    from ..models.plain_cnn import StagedCnn

    # The package's own architectures say in their signature which regularization they take.
    entrypoint = model_entrypoint(split_model_name_tag(cfg.model)[0])
    own = entrypoint.__module__.startswith(StagedCnn.__module__.rpartition(".")[0])
    if own and cfg.drop_path is not None and "drop_path_rate" not in inspect.signature(StagedCnn).parameters:
        raise ConfigError(
            f"--drop-path: {cfg.model} takes no drop_path_rate (a plain net has no residual branch "
            "to drop); leave --drop-path out for this model"
        )


def validate_config(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for settings out of range, unknown names, or contradictions.

    Nothing here touches the file system or builds anything: it runs first, before any work.
    """
    _check_numbers(cfg)
    _check_names(cfg)
    check_model_arguments(cfg)
    if cfg.baseline and cfg.modulation is not False:
        raise ConfigError("--baseline means no modulation; drop --modulation or --baseline")
    if cfg.baseline and cfg.init == "orthonormal":
        raise ConfigError("--baseline means MSRA init; drop --init orthonormal or --baseline")
    if cfg.amp_dtype not in ("float16", "bfloat16"):
        raise ConfigError(f"--amp-dtype must be float16 or bfloat16, got {cfg.amp_dtype!r}")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ConfigError(f"mixup/cutmix need an even --batch-size, got {cfg.batch_size}")
