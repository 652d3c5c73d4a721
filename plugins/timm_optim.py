"""timm's optimizer factory with the orthonormality term in place of weight decay.

``create_ortho_optimizer`` is ``timm.optim.create_optimizer_v2`` for a model trained with
``OrthoModulated``: the target weights (Conv/Linear) get no weight decay, every other parameter is
treated the way timm treats it (1-D parameters and biases without decay), and the result is wrapped.

    from plugins.timm_optim import create_ortho_optimizer
    opt = create_ortho_optimizer(model, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-4,
                                 ortho_decay=1e-4, modulation=True)

It is also what a training script built on timm's ``train.py`` conventions calls where it would call
``create_optimizer_v2(model, **optimizer_kwargs(cfg=args))``.
"""

from __future__ import annotations

from typing import Any

from timm.optim import create_optimizer_v2
from torch import nn

from timm_ortho import OrthoModulated
from timm_ortho.optim import DEFAULT_ORTHO_DECAY, param_groups_for_ortho


def create_ortho_optimizer(
    model: nn.Module,
    opt: str = "sgd",
    lr: float | None = None,
    weight_decay: float = 0.0,
    *,
    ortho_decay: float = DEFAULT_ORTHO_DECAY,
    modulation: bool | dict[str, Any] = False,
    form: str = "auto",
    target_kwargs: dict[str, Any] | None = None,
    **opt_kwargs: Any,
) -> OrthoModulated:
    """Build a timm optimizer whose target weights get no L2, then wrap it in ``OrthoModulated``.

    ``weight_decay`` applies to non-target parameters with two or more dimensions only (e.g. a
    ViT's position embedding); like timm, 1-D parameters and biases get none.
    """
    groups = param_groups_for_ortho(model, weight_decay, **(target_kwargs or {}))
    base = create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=weight_decay, **opt_kwargs)
    return OrthoModulated(
        base,
        model,
        ortho_decay=ortho_decay,
        modulation=modulation,
        form=form,
        **(target_kwargs or {}),
    )
