"""Which form of the orthonormality term an optimizer gets: coupled or decoupled.

The form follows what kind of update the base optimizer makes, not the names of its arguments:

* **coupled** (``grad += dR/dW``, the paper's form) for optimizers whose update is the gradient
  (with momentum, projection or one trust-ratio scalar per layer): SGD, SGDW, SGDP, LARS, ASGD and
  L-BFGS. The term then acts exactly where L2 weight decay would, and ``ortho_decay`` is comparable
  to a weight-decay coefficient.
* **decoupled** (``W -= lr * dR/dW``) for optimizers that rescale each coordinate by statistics of
  the gradient, take its sign or normalize the update: the Adam family, RMSprop, Adagrad, Adadelta,
  Adafactor, MADGRAD, Lion, LAMB, Muon and the rest. Added to the gradient, the term would be
  divided by those statistics, so its strength would depend on the scale of the gradients; applied
  to the weights it behaves like AdamW's decoupled weight decay.

``docs/optimizer.md`` has the table with the reason for each optimizer. Optimizers are recognized by
class (subclasses inherit the form) and by the top-level package that defines them, so optional
back ends (apex, bitsandbytes) need not be installed to be classified. Wrappers such as timm's
``Lookahead`` are looked through.
"""

import warnings
from typing import Any, Literal

from torch.optim import Optimizer

__all__ = ["COUPLED", "DECOUPLED", "Form", "known_form", "optimizer_form", "resolve_form"]

Form = Literal["coupled", "decoupled"]

# (top-level package, class name). The update is the gradient, up to momentum / a per-layer scalar.
COUPLED: frozenset[tuple[str, str]] = frozenset(
    {
        ("torch", "SGD"),
        ("torch", "ASGD"),
        ("torch", "LBFGS"),  # quasi-Newton: the term belongs to the objective whose gradient it reads
        ("timm", "SGDP"),
        ("timm", "SGDW"),
        ("timm", "Lars"),  # trust ratio: one scalar per layer, L2 is added to the gradient before it
        ("apex", "FusedSGD"),
        ("bitsandbytes", "SGD"),
        ("bitsandbytes", "SGD8bit"),
        ("bitsandbytes", "SGD32bit"),
        ("bitsandbytes", "LARS"),
        ("bitsandbytes", "LARS8bit"),
        ("bitsandbytes", "LARS32bit"),
    }
)

# Per-coordinate adaptive, sign-based or normalized updates.
DECOUPLED: frozenset[tuple[str, str]] = frozenset(
    {("torch", n) for n in ("Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adagrad", "Adadelta")}
    | {("torch", n) for n in ("RMSprop", "Rprop", "SparseAdam", "Adafactor", "Muon")}
    | {
        ("timm", n)
        for n in (
            "AdamWLegacy",
            "AdamP",
            "NAdamLegacy",
            "NAdamW",
            "RAdamLegacy",
            "Adafactor",
            "AdafactorBigVision",
            "Adopt",
            "Lamb",
            "LaProp",
            "Lion",
            "MADGRAD",
            "Mars",
            "Kron",
            "AdaBelief",
            "Adan",
            "Adahessian",
            "NvNovoGrad",
            "RMSpropTF",
            "Muon",
        )
    }
    | {("apex", n) for n in ("FusedAdam", "FusedLAMB", "FusedNovoGrad")}
    | {
        ("bitsandbytes", n)
        for n in (
            "Adam",
            "AdamW",
            "Adam8bit",
            "AdamW8bit",
            "Adam32bit",
            "AdamW32bit",
            "PagedAdam",
            "PagedAdamW",
            "PagedAdam8bit",
            "PagedAdamW8bit",
            "PagedAdamW32bit",
            "Lion",
            "Lion8bit",
            "PagedLion",
            "PagedLion8bit",
            "LAMB",
            "LAMB8bit",
            "Adagrad",
            "Adagrad8bit",
            "RMSprop",
            "RMSprop8bit",
            "AdEMAMix",
            "AdEMAMix8bit",
            "PagedAdEMAMix",
            "PagedAdEMAMix8bit",
        )
    }
)


def _key(cls: type | str) -> tuple[str, str]:
    if isinstance(cls, str):  # a dotted path, as timm's registry names apex / bitsandbytes classes
        module, _, name = cls.rpartition(".")
    else:
        module, name = cls.__module__, cls.__qualname__
    return module.split(".")[0], name


def known_form(cls: type | str) -> Form | None:
    """The form for an optimizer class (or a dotted class path), or ``None`` if the class is unknown.

    A subclass of a known class gets its parent's form.
    """
    mro = [cls] if isinstance(cls, str) else list(cls.__mro__)
    for c in mro:
        key = _key(c)
        if key in COUPLED:
            return "coupled"
        if key in DECOUPLED:
            return "decoupled"
    return None


def _unwrap(optimizer: Any) -> Any:
    """Look through wrappers that keep the optimizer doing the update (timm's Lookahead, ...)."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "_base_optimizer", None) or getattr(optimizer, "base_optimizer", None)
        if not isinstance(inner, Optimizer):
            break
        optimizer = inner
    return optimizer


def optimizer_form(optimizer: Optimizer) -> Form:
    """The form that ``form="auto"`` picks for ``optimizer``.

    An optimizer class this module does not know gets ``decoupled`` if its defaults have ``betas``
    (an Adam-like optimizer) and ``coupled`` otherwise, with a warning that asks for ``form=``.
    """
    inner = _unwrap(optimizer)
    form = known_form(type(inner))
    if form is not None:
        return form
    guess: Form = "decoupled" if "betas" in getattr(inner, "defaults", {}) else "coupled"
    warnings.warn(
        f"OrthoModulated does not know the optimizer {type(inner).__module__}.{type(inner).__qualname__}; "
        f"using the {guess} form (it {'has' if guess == 'decoupled' else 'has no'} `betas`). Pass "
        "form='coupled' if its update is the gradient (SGD-like) or form='decoupled' if it rescales "
        "each coordinate (Adam-like).",
        stacklevel=4,  # the caller of OrthoModulated(...)
    )
    return guess


def resolve_form(optimizer: Optimizer, form: str) -> Form:
    """``form`` checked, with ``"auto"`` resolved by :func:`optimizer_form`.

    The decoupled form scales the term by each group's ``lr``, so every group needs a numeric lr
    (timm's Adafactor with ``lr=None`` computes its own step size and has none).
    """
    if form not in ("auto", "coupled", "decoupled"):
        raise ValueError(f"form must be 'auto', 'coupled' or 'decoupled', got {form!r}")
    resolved: Form = optimizer_form(optimizer) if form == "auto" else form  # type: ignore[assignment]
    if resolved == "decoupled":
        for i, group in enumerate(optimizer.param_groups):
            if not _is_number(group.get("lr")):
                raise ValueError(
                    f"the decoupled form applies lr * dR/dW, but param group {i} has lr={group.get('lr')!r} "
                    f"({type(_unwrap(optimizer)).__name__} without an explicit lr computes its own step "
                    "size). Give the optimizer a learning rate, or pass form='coupled'."
                )
    return resolved


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
