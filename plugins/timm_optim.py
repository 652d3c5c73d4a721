"""timm's optimizer factory with the orthonormality term in place of weight decay.

    from timm_ortho.plugins.timm_optim import create_optimizer
    opt = create_optimizer(model, "sgd", lr=0.1, weight_decay=1e-4, ortho_decay=1e-4, modulation=True)

is timm's ``create_optimizer_v2(model, "sgd", ...)`` with timm's own parameter groups
(``no_weight_decay()``, ``layer_decay``, ``param_group_fn``, ``filter_bias_and_bn``), the regularized
Conv/Linear weights without L2, wrapped in ``OrthoModulated``. The implementation is
:mod:`timm_ortho.factory`; this module keeps the plug-in's import path.
"""

from timm_ortho.factory import create_optimizer, create_ortho_optimizer

__all__ = ["create_optimizer", "create_ortho_optimizer"]
