"""Adapters that bring OrthoModulated into other people's training loops.

This folder is installed as ``timm_ortho.plugins`` (``pip install .`` maps it there):

* :mod:`timm_ortho.plugins.timm_optim`: ``create_optimizer``, timm's optimizer factory with the
  orthonormality term in place of weight decay;
* :mod:`timm_ortho.plugins.run_timm`: runs one of timm's scripts (``train.py``, ``validate.py``,
  ``inference.py``) with the registered models, and for ``train.py`` with ``--opt ortho_<name>``
  built by that factory (timm's own registry cannot express an optimizer that needs the model).
"""
