"""The checks a :class:`~timm_ortho.train.config.TrainConfig` passes before any work: every number in
its field's range, every name in timm's registries (close names suggested), no contradicting flags.

The ranges and choices are the fields' own (their ``cli(...)`` metadata and type hints), so a new
field is checked without code here; what is here is what no single field can say.
"""

from __future__ import annotations

import difflib
import inspect
import math
import typing

from ..factory import ORTHO_PREFIX
from .config import SCHEDULERS, ConfigError, TrainConfig, base_optimizer_name, field_specs
from .flags import flag_of, from_hint

__all__ = ["check_model_arguments", "validate_config"]


def _did_you_mean(name: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _check_fields(cfg: TrainConfig) -> None:
    """Every number in its field's range, every name among its field's choices.

    argparse lets ``nan``, ``inf`` and ``-1`` through, and a :class:`TrainConfig` built in Python
    meets no parser at all.
    """
    for name, hint, spec in field_specs():
        value, implied = getattr(cfg, name), from_hint(hint)
        if value is not None and "choices" in implied and value not in implied["choices"]:
            choices = ", ".join(implied["choices"])
            raise ConfigError(f"{flag_of(name)} must be one of {choices}, got {value!r}")
        if value is None or value == "auto" or spec["bounds"] is None:  # "auto": resolved when built
            continue
        low, high, inclusive, high_inclusive = spec["bounds"]
        if implied.get("type") is int:
            rule, high, inclusive, high_inclusive = f"at least {low}", math.inf, True, True
        else:
            upper = "" if high == math.inf else f" and {'<=' if high_inclusive else '<'} {high:g}"
            rule = f"a finite number {'>=' if inclusive else '>'} {low:g}{upper}"
        for v in value if isinstance(value, list) else [value]:
            below = v < low if inclusive else v <= low
            above = v > high if high_inclusive else v >= high
            if not isinstance(v, (int, float)) or not math.isfinite(v) or below or above:
                raise ConfigError(f"{flag_of(name)} must be {rule}, got {value}")
    if cfg.precise_bn is not None and cfg.precise_bn < 0:
        raise ConfigError(f"--precise-bn takes a number of batches >= 0 (0: off), got {cfg.precise_bn}")
    if cfg.epochs < 1 and cfg.iterations is None:
        raise ConfigError(f"--epochs must be positive, got {cfg.epochs}")


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
    *prefix, opt = base_optimizer_name(cfg.opt).split("_")
    if prefix not in ([], ["lookahead"]) or opt not in list_optimizers():
        given = cfg.opt.lower()
        with_prefix = given.startswith(ORTHO_PREFIX)
        known = [ORTHO_PREFIX + n if with_prefix else n for n in list_optimizers()]
        raise ConfigError(
            f"--opt {cfg.opt}: timm has no such optimizer{_did_you_mean(given, known)} "
            "(timm.optim.list_optimizers() lists them; lookahead_<name> wraps one in Lookahead; ortho_<name> "
            "is <name> here, the trainer applies the method itself)"
        )
    if cfg.sched not in SCHEDULERS:
        raise ConfigError(
            f"--sched {cfg.sched}: timm has no such scheduler{_did_you_mean(cfg.sched, SCHEDULERS)} "
            f"(one of {', '.join(SCHEDULERS)})"
        )
    if cfg.sched == "plateau":
        raise ConfigError(
            "--sched plateau lowers the lr once per epoch when an evaluation metric stalls; the trainer "
            "steps its schedule per update and gives it no metric: choose another (cosine, multistep, ...)"
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
    _check_fields(cfg)
    _check_names(cfg)
    check_model_arguments(cfg)
    if cfg.baseline and cfg.modulation not in (False, "auto"):
        raise ConfigError("--baseline means no modulation; drop --modulation or --baseline")
    if cfg.baseline and base_optimizer_name(cfg.opt) != cfg.opt.lower():
        raise ConfigError(
            f"--opt {cfg.opt} asks for the orthonormality method, which --baseline turns off; use "
            f"--opt {base_optimizer_name(cfg.opt)} with --baseline, or drop --baseline"
        )
    if cfg.baseline and cfg.init == "orthonormal":
        raise ConfigError("--baseline means MSRA init; drop --init orthonormal or --baseline")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ConfigError(f"mixup/cutmix need an even --batch-size, got {cfg.batch_size}")
