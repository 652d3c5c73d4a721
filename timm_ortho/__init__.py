"""timm_ortho: orthonormality regularization and backward error modulation for deep plain CNNs.

Importing the package registers the plain-CNN family with timm (``timm.list_models("plain_cnn*")``);
timm's optimizer registry is left as it is. The wrapped optimizer comes from
:func:`create_optimizer` (timm's factory, timm's parameter groups) or :class:`OrthoModulated`
around an optimizer of your own; timm's ``train.py`` reaches it through
``python -m timm_ortho.plugins.run_timm train.py ... --opt ortho_<name>`` (docs/timm.md).
"""

import itertools
import sys
import warnings
from pathlib import Path

from . import models  # noqa: F401  (registers the architectures with timm)
from .chain import check_plain_chain
from .factory import create_optimizer, create_ortho_optimizer
from .init import init_weights_
from .optim import OrthoModulated, param_groups_for_ortho
from .ortho import mean_abs_cosine, orthonormal_, orthonormality_grad, orthonormality_penalty
from .precise_bn import recompute_bn_statistics
from .shaping import tat_leaky_relu_slope
from .step_bound import bound_gradients_
from .targets import FilterBank, find_targets

__version__ = "0.1.0"

__all__ = [
    "FilterBank",
    "OrthoModulated",
    "bound_gradients_",
    "check_plain_chain",
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


def _warn_about_ortho_names_timm_would_ignore(argv: list[str]) -> None:
    """timm's ``train.py --device-modules timm_ortho --opt ortho_sgd`` would silently train plain SGD
    (timm reads the last word of the name): say so. Under the runner, ``sys.argv`` becomes the
    script's only after this import."""
    if not argv or Path(argv[0]).name != "train.py":
        return
    values = [b for a, b in itertools.pairwise(argv) if a == "--opt"]
    values += [a.split("=", 1)[1] for a in argv if a.startswith("--opt=")]
    if any(v.lower().startswith("ortho_") for v in values):
        warnings.warn(
            "--opt ortho_<name>: timm's create_optimizer_v2 builds the plain optimizer for such a name "
            "(it reads only the last word). Run the script through the runner that routes it to "
            "timm_ortho.create_optimizer: python -m timm_ortho.plugins.run_timm train.py ... (docs/timm.md)",
            UserWarning,
            stacklevel=2,
        )


_warn_about_ortho_names_timm_would_ignore(sys.argv)
