"""timm_ortho: orthonormality regularization and backward error modulation for deep plain CNNs.

Importing the package registers the plain-CNN family with timm (``timm.list_models("plain_cnn*")``)
and an ``ortho_<name>`` optimizer for every optimizer of timm's factory
(``timm.optim.create_optimizer_v2(model, "ortho_sgd", ...)``, ``train.py --opt ortho_sgd``).
"""

from . import models  # noqa: F401  (registers the architectures with timm)
from .factory import create_optimizer, create_ortho_optimizer, register_timm_optimizers
from .init import init_weights_
from .optim import OrthoModulated, param_groups_for_ortho
from .ortho import mean_abs_cosine, orthonormal_, orthonormality_grad, orthonormality_penalty
from .precise_bn import recompute_bn_statistics
from .shaping import tat_leaky_relu_slope
from .targets import FilterBank, find_targets

__version__ = "0.1.0"

register_timm_optimizers()

__all__ = [
    "FilterBank",
    "OrthoModulated",
    "create_optimizer",
    "create_ortho_optimizer",
    "find_targets",
    "init_weights_",
    "mean_abs_cosine",
    "orthonormal_",
    "orthonormality_grad",
    "orthonormality_penalty",
    "param_groups_for_ortho",
    "recompute_bn_statistics",
    "tat_leaky_relu_slope",
]
