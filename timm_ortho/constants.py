"""Per-channel statistics of the data sets the registered models are configured for.

The model configurations (``pretrained_cfg["mean"]``/``["std"]``) and the training application's
normalization read them from here, so the two cannot drift apart.
"""

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD"]

# Per-channel statistics of the 50k CIFAR-10 training images, pixels scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
