"""The training application around the library: configuration, data, the Accelerate loop,
checkpoints, logging, plots and the measurement runs behind ``scripts/reproduce.py``.

``import timm_ortho`` never imports this package (it needs accelerate and matplotlib); the scripts and
``accelerate launch scripts/train_imagenet.py`` do.
"""
