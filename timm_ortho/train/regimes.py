"""What each regime of a measurement run (:mod:`timm_ortho.train.experiments`) builds: the model with
its initialization, the optimizer, and for the bare-optimizer regimes the step bound the wrapper
would apply.

- ``"l2"`` / ``"none"``: MSRA init, the bare optimizer with / without L2 weight decay;
- ``"default"``: the model as created and ``OrthoModulated(SGD(...), model)`` on the library's defaults;
- ``"ortho"`` / ``"ortho_mod"``: orthonormal init, the orthonormality term, without / with modulation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import timm
import torch
from torch import nn

from ..factory import create_optimizer
from ..step_bound import auto_max_grad_ratio

if TYPE_CHECKING:  # experiments.py imports this module
    from .experiments import RunConfig
    from .tensor_data import TensorData

__all__ = ["baseline_bound", "regime_model", "regime_optimizer"]


def regime_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The regime's optimizer; every wrapped one comes from :func:`timm_ortho.create_optimizer`.

    timm's ``"momentum"`` is torch's SGD without Nesterov and, with ``weight_decay=0``, takes
    ``model.parameters()`` as its one group: ``"default"`` is therefore exactly the user's
    ``OrthoModulated(torch.optim.SGD(model.parameters(), lr, momentum=0.9), model)``.
    """
    if cfg.method in ("l2", "none"):  # the baselines are a bare optimizer
        weight_decay = cfg.weight_decay if cfg.method == "l2" else 0.0
        if cfg.opt == "momentum":  # every parameter decayed, as He et al.
            return torch.optim.SGD(
                model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=weight_decay
            )
        from timm.optim import create_optimizer_v2

        return create_optimizer_v2(
            model, cfg.opt, lr=cfg.lr, weight_decay=weight_decay, momentum=cfg.momentum
        )
    if cfg.method == "default":  # the library's defaults; ablations change one option in cfg.wrapper
        options = cfg.wrapper
    else:
        modulation = (dict(cfg.modulation) or True) if cfg.method == "ortho_mod" else False
        options = dict(ortho_decay=cfg.ortho_decay, max_grad_ratio=cfg.max_grad_ratio, modulation=modulation)
    return create_optimizer(model, cfg.opt, lr=cfg.lr, weight_decay=0.0, momentum=cfg.momentum, **options)


def regime_model(cfg: RunConfig, data: TensorData) -> nn.Module:
    """The regime's model: MSRA init for the baselines, orthonormal for the method's regimes, the
    model as created for ``"default"`` (unless ``cfg.init`` says otherwise).

    This package's nets take ``init`` (and ``act_layer``) as creation arguments. Any other timm model
    keeps its own initialization for ``"msra"`` (timm's ResNets: He et al.'s) and gets orthonormal
    filters from :func:`timm_ortho.init_weights_` (biases kept) for ``"orthonormal"``, as the trainer.
    """
    from timm.models import model_entrypoint

    from ..init import init_weights_

    init = cfg.init or {"l2": "msra", "none": "msra", "default": None}.get(cfg.method, "orthonormal")
    kwargs = dict(in_chans=data.x_train.shape[1], act_layer=cfg.act_layer, **cfg.model_kwargs)
    own = model_entrypoint(cfg.model).__module__.startswith(__package__.rpartition(".")[0] + ".models")
    if own:
        kwargs["init"] = init
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = timm.create_model(cfg.model, num_classes=data.num_classes, **kwargs)
    if not own and init == "orthonormal":
        init_weights_(model, "orthonormal", zero_bias=False)
    return model


def baseline_bound(cfg: RunConfig, model: nn.Module, targets: list) -> tuple[list, float] | None:
    """For the bare-optimizer regimes: the step bound the wrapper would apply, as ``(weights, ratio)``."""
    if cfg.method not in ("l2", "none") or cfg.max_grad_ratio is None:
        return None
    weights = [t.param for t in targets]
    ratio = auto_max_grad_ratio(model, len(weights)) if cfg.max_grad_ratio == "auto" else cfg.max_grad_ratio
    return None if ratio is None else (weights, ratio)
