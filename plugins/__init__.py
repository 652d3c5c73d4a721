"""Adapters that bring OrthoModulated into other people's training loops.

This folder is installed as ``timm_ortho.plugins`` (``pip install .`` maps it there):

* :mod:`timm_ortho.plugins.timm_optim`: ``create_ortho_optimizer``, timm's optimizer factory with the
  orthonormality term in place of weight decay (also reachable as ``--opt ortho_<name>``);
* :mod:`timm_ortho.plugins.run_timm`: runs one of timm's scripts (``validate.py``, ``inference.py``,
  ``train.py``) with the registered models and optimizers, for scripts that have no
  ``--device-modules`` flag.
"""
