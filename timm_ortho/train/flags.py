"""How a :class:`~timm_ortho.train.config.TrainConfig` field becomes a command-line flag.

A field's ``Annotated[type, cli(...)]`` metadata (:func:`cli`) holds its help, extra spellings,
aliases and a number's range; :func:`from_hint` gives the argparse keywords its type hint implies.
The ``--modulation`` flag takes a preset name, ``KEY=VALUE`` pairs or nothing, and its ``--mod-*``
aliases each set one key: :class:`ModulationAction` parses all of them into the one setting.
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from typing import Any, Literal

from timm.utils import ParseKwargs

from ..defaults import MODULATION_PRESETS

__all__ = ["MODULATION_ALIASES", "ModulationAction", "cli", "flag_of", "from_hint", "number_or_auto"]


def cli(
    help: str | None = None,
    *,
    group: str | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float = math.inf,
    lt: float | None = None,
    **argparse_kwargs: Any,
) -> dict[str, Any]:
    """The command-line side of a :class:`TrainConfig` field, as ``Annotated[type, cli(...)]``.

    ``group`` opens a new argparse group at this field; ``ge``/``gt`` and ``le``/``lt`` give the range of a
    number (of each number of a list; ``None`` passes), which argparse does not check (``nan``,
    ``-1``): :func:`~timm_ortho.train.validation.validate_config` does. ``flags`` adds short or
    timm-style spellings (a long one replaces the flag derived from the name); ``aliases`` maps extra
    flags to the argparse keywords that make them write into this field; the other keywords go to
    ``add_argument`` over what the type hint implies. A field without it gets a flag from its name
    and type alone. Every option without a help text shows its default.
    """
    if ge is None and gt is None:
        bounds = None
    else:  # (low, high, low included, high included)
        bounds = (gt if ge is None else ge, le if lt is None else lt, ge is not None, lt is None)
    return {"help": help or "(default: %(default)s)", "group": group, "bounds": bounds, **argparse_kwargs}


def number_or_auto(text: str) -> float | str:
    """argparse type of a number that may also be left to the library (``auto``)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


class ModulationAction(ParseKwargs):
    """``--modulation [auto | top | paper | KEY=VALUE ...]``: alone, on (the ``top`` rule); a preset
    name, that preset; pairs, ErrorModulation options; ``--no-modulation``: off. Not given: ``auto``
    (on for plain chains only). With a ``key``, a ``--mod-*`` alias: sets that one option, which takes
    effect once ``--modulation`` is on, given before or after it.
    """

    def __init__(self, *args: Any, key: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key = key

    def __call__(self, parser, namespace, values, option_string=None):
        pending, current = getattr(namespace, "_mod_options", {}), getattr(namespace, self.dest)
        if self.key is not None:
            namespace._mod_options = {**pending, self.key: self.const if self.nargs == 0 else values}
            if current is False or isinstance(current, str):  # not (yet) on with options of its own
                return
            options = {**(current if isinstance(current, dict) else {}), **namespace._mod_options}
        elif option_string == "--no-modulation":
            options = False
        elif len(values) == 1 and "=" not in values[0]:
            if values[0] not in _MODULATION_NAMES:
                raise argparse.ArgumentError(
                    self,
                    f"expected one of {', '.join(_MODULATION_NAMES)} or KEY=VALUE pairs, got {values[0]!r}",
                )
            options = values[0]
        else:
            super().__call__(parser, namespace, values, option_string)
            options = {**pending, **getattr(namespace, self.dest)} or True
        setattr(namespace, self.dest, options)


_MODULATION_NAMES = ("auto", *MODULATION_PRESETS)


def _mod_alias(key: str, help: str = "ErrorModulation's option", **argparse_kwargs: Any) -> dict[str, Any]:
    return dict(
        action=ModulationAction, key=key, help=f"same as --modulation {key}=...; {help}", **argparse_kwargs
    )


MODULATION_ALIASES = {
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


def from_hint(hint: Any) -> dict[str, Any]:
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


def flag_of(name: str) -> str:
    """The long flag of the field ``name`` (``--pin-memory`` for ``pin_memory``)."""
    return f"--{name.replace('_', '-')}"
