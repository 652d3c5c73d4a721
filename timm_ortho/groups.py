"""Parameter groups in which the orthonormality term's weights get no weight decay.

The term replaces L2 decay on the weights it regularizes (the paper: never both on one weight), so the
base optimizer's groups must leave them undecayed. :func:`param_groups_for_ortho` builds such groups
from a model; :func:`groups_without_decay_on` moves the targets out of decayed groups that someone
else built (timm's factory, a ``param_group_fn``), before the optimizer exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from .targets import FilterBank, find_targets

__all__ = ["groups_without_decay_on", "param_groups_for_ortho"]


def param_groups_for_ortho(
    model: nn.Module,
    weight_decay: float = 0.0,
    targets: Iterable[FilterBank] | None = None,
    **target_kwargs: Any,
) -> list[dict[str, Any]]:
    """Param groups for a base optimizer in which no target weight gets L2 decay.

    Three groups (empty ones left out): the target weights with ``weight_decay=0`` (the
    orthonormality term replaces decay on them), the other parameters timm's
    ``param_groups_weight_decay`` decays (e.g. 2-D embeddings) with ``weight_decay``, and those it
    leaves without decay (1-D parameters, biases, the model's ``no_weight_decay()`` names).
    """
    from timm.optim import param_groups_weight_decay

    banks = list(targets) if targets is not None else find_targets(model, **target_kwargs)
    ids = {id(t.param) for t in banks}
    no_decay_names = getattr(model, "no_weight_decay", lambda: set())()
    ortho = [p for p in model.parameters() if p.requires_grad and id(p) in ids]
    decayed: list[nn.Parameter] = []
    flat: list[nn.Parameter] = []
    # timm sorts the parameters (weight_decay=1 only marks its decayed group); targets are taken out.
    for group in param_groups_weight_decay(model, 1.0, no_weight_decay_list=no_decay_names):
        (decayed if group["weight_decay"] else flat).extend(p for p in group["params"] if id(p) not in ids)
    groups = [
        {"params": ortho, "weight_decay": 0.0},
        {"params": decayed, "weight_decay": weight_decay},
        {"params": flat, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def groups_without_decay_on(
    groups: Sequence[dict[str, Any]], targets: Sequence[FilterBank], default_decay: float = 0.0
) -> list[dict[str, Any]]:
    """``groups`` with every target weight moved out of a decayed group into a sibling without decay.

    A group without a ``weight_decay`` key decays by ``default_decay`` (the optimizer's default).
    Every other field of a split group (``lr_scale``, ``use_fallback``, ...) is kept on both halves;
    groups are returned in order, a split group as ``[the rest, its targets]``.
    """
    ids = {id(t.param) for t in targets}
    out: list[dict[str, Any]] = []
    for group in groups:
        params = list(group["params"])
        decay = group.get("weight_decay", default_decay)
        mine = [p for p in params if id(p) in ids]
        if not mine or not decay:
            out.append({**group, "params": params, "weight_decay": decay})
            continue
        rest = [p for p in params if id(p) not in ids]
        if rest:
            out.append({**group, "params": rest, "weight_decay": decay})
        out.append({**group, "params": mine, "weight_decay": 0.0})
    return out
