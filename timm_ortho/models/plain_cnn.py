"""Plain CNNs (Conv-BN-ReLU chains, no shortcuts) and their residual twins, registered with timm.

The networks of Xie, Xiong & Pu (CVPR 2017, arXiv:1703.01827, Fig. 1), "similar to the plain CNN of
He et al.": every parametric layer is a ``conv -> BatchNorm -> ReLU`` triple and the layers form a
single chain. Importing :mod:`timm_ortho` registers them, so ``timm.create_model("plain_cnn110")``
works like any timm model.

Families (the number in a name counts conv + fully connected layers):

* ``plain_cnn{20,32,44,56,110,1202}``: CIFAR layout, ``6n + 2`` layers. A 3x3 stem conv with 16
  filters, three stages of ``2n`` 3x3 convs with 16/32/64 filters on 32/16/8-pixel maps (the first
  conv of stages 2 and 3 has stride 2), global average pool, FC.
* ``cifar_resnet{20,32,44,56,110,1202}``: He et al.'s CIFAR ResNets, the same convs grouped in ``n``
  two-conv basic blocks per stage with parameter-free identity shortcuts (option A: subsample by the
  stride, zero-pad the new channels). Option A keeps exactly the plain net's parametric layers, so a
  twin differs from its plain net by the shortcuts alone.
* ``plain_cnn{44,110}_imagenet``: a ResNet stem (7x7/2 conv with 64 filters, 3x3/2 max pool) and
  four stages of 3x3 convs with 64/128/256/512 filters. Stage depths follow the block proportions of
  the ResNets the paper trained on ImageNet: 3:4:6:3 (ResNet-34) gives 8/10/16/8 convs for 44 layers,
  3:4:23:3 (ResNet-101) gives 10/13/75/10 convs for 110 layers.

Every conv of these nets has ``f_in = in_channels * kh * kw >= f_out = out_channels`` (the paper's
design principle: orthonormal filters need at least as many dimensions as filters). The only
exception at default settings is the ImageNet classifier (512 -> 1000), which the regularizer and
the orthonormal initialization then treat group-wise.

The blocks and the common base with timm's model API are in :mod:`timm_ortho.models.staged`.

Initialization is a creation argument: ``init="orthonormal"`` (default, the paper's: every conv and
linear weight gets orthonormal filters, group-wise where ``f_out > f_in``) or ``init="msra"`` (the
baseline: He et al.'s Kaiming-normal, fan-out, ReLU gain on every conv; the classifier keeps
PyTorch's default uniform init as in timm's ResNet). Both set BatchNorm to weight 1, bias 0 and all
biases to 0.
"""

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..constants import CIFAR10_MEAN, CIFAR10_STD
from ..defaults import INIT_SCHEMES, InitScheme
from .staged import TAT_ACT, BasicBlock, ConvBnAct, PadShortcut, StagedCnn, resolve_act_layer

__all__ = [
    "INIT_SCHEMES",
    "TAT_ACT",
    "BasicBlock",
    "CifarResNet",
    "ConvBnAct",
    "InitScheme",
    "PadShortcut",
    "PlainCnn",
    "StagedCnn",
    "resolve_act_layer",
]

_METHOD_PAPER = "arXiv:1703.01827"
_RESNET_PAPER = "arXiv:1512.03385"
_METHOD_PAPER_NAME = (
    "All You Need is Beyond a Good Init: Exploring Better Solution for Training Extremely Deep "
    "Convolutional Neural Networks with Orthonormality and Modulation"
)


class PlainCnn(StagedCnn):
    """A plain chain of Conv-BN-activation layers (no shortcuts); each block is one :class:`ConvBnAct`.

    The default activation is the depth-shaped leaky ReLU (``act_layer="leaky_relu_tat"``), chosen by
    the depth suite in ``docs/results.md``; ``act_layer="relu"`` gives the paper's exact Conv-BN-ReLU.
    """

    block_cls = ConvBnAct
    convs_per_block = 1
    default_act = TAT_ACT


class CifarResNet(StagedCnn):
    """He et al.'s CIFAR ResNet: the plain net's convs in :class:`BasicBlock` pairs, option-A shortcuts."""

    block_cls = BasicBlock
    convs_per_block = 2


# Conv + FC layers -> n of the 6n + 2 CIFAR layout.
_CIFAR_DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18, 1202: 200}
_CIFAR_WIDTHS = (16, 32, 64)
_IMAGENET_WIDTHS = (64, 128, 256, 512)
# Convs per stage (1 stem + these + 1 FC = the depth in the name), block proportions of ResNet-34
# (3:4:6:3) for 44 layers and of ResNet-101 (3:4:23:3) for 110 layers.
_IMAGENET_DEPTHS = {44: (8, 10, 16, 8), 110: (10, 13, 75, 10)}


def _create(model_cls: type[StagedCnn], variant: str, pretrained: bool = False, **kwargs: Any) -> StagedCnn:
    # timm's features_only default is 5 levels; these nets have 3 (CIFAR) or 5 (ImageNet).
    levels = len(kwargs["depths"]) + int(kwargs.get("stem", "cifar") == "imagenet")
    # A caller's feature_cfg (e.g. {"feature_cls": "fx"}) is merged over these defaults.
    feature_cfg = dict(flatten_sequential=True, out_indices=tuple(range(levels)))
    feature_cfg.update(kwargs.pop("feature_cfg", None) or {})
    return build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


def _create_plain_cifar(depth: int, pretrained: bool, **kwargs: Any) -> PlainCnn:
    n = _CIFAR_DEPTHS[depth]
    model_args = dict(depths=(2 * n,) * 3, widths=_CIFAR_WIDTHS, stem="cifar")
    return _create(PlainCnn, f"plain_cnn{depth}", pretrained, **dict(model_args, **kwargs))


def _create_resnet_cifar(depth: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    n = _CIFAR_DEPTHS[depth]
    model_args = dict(depths=(n,) * 3, widths=_CIFAR_WIDTHS, stem="cifar")
    return _create(CifarResNet, f"cifar_resnet{depth}", pretrained, **dict(model_args, **kwargs))


def _create_plain_imagenet(depth: int, pretrained: bool, **kwargs: Any) -> PlainCnn:
    model_args = dict(depths=_IMAGENET_DEPTHS[depth], widths=_IMAGENET_WIDTHS, stem="imagenet")
    return _create(PlainCnn, f"plain_cnn{depth}_imagenet", pretrained, **dict(model_args, **kwargs))


_NO_WEIGHTS = ("architecture only: no pretrained weights are published",)


def _cfg_cifar(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "stem.conv",
        "classifier": "head.fc",
        "license": "apache-2.0",
        "paper_ids": _METHOD_PAPER,
        "paper_name": _METHOD_PAPER_NAME,
        "notes": _NO_WEIGHTS,
        **kwargs,
    }


def _cfg_imagenet(**kwargs: Any) -> dict[str, Any]:
    return _cfg_cifar(
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=0.875,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        **kwargs,
    )


_RESNET_CFG = dict(
    paper_ids=(_RESNET_PAPER, _METHOD_PAPER), paper_name="Deep Residual Learning for Image Recognition"
)

default_cfgs = generate_default_cfgs(
    {
        **{f"plain_cnn{d}": _cfg_cifar() for d in _CIFAR_DEPTHS},
        **{f"cifar_resnet{d}": _cfg_cifar(**_RESNET_CFG) for d in _CIFAR_DEPTHS},
        **{f"plain_cnn{d}_imagenet": _cfg_imagenet() for d in _IMAGENET_DEPTHS},
    }
)


@register_model
def plain_cnn20(pretrained: bool = False, **kwargs: Any) -> PlainCnn:
    """Plain CIFAR net, 20 layers (n=3): 1 + 3x6 convs + FC."""
    return _create_plain_cifar(20, pretrained, **kwargs)


@register_model
def plain_cnn32(pretrained: bool = False, **kwargs: Any) -> PlainCnn:
    """Plain CIFAR net, 32 layers (n=5): 1 + 3x10 convs + FC."""
    return _create_plain_cifar(32, pretrained, **kwargs)


@register_model
def plain_cnn44(pretrained: bool = False, **kwargs: Any) -> PlainCnn:
    """Plain CIFAR net, 44 layers (n=7): 1 + 3x14 convs + FC, the paper's main CIFAR-10 net."""
    return _create_plain_cifar(44, pretrained, **kwargs)


@register_model
def plain_cnn56(pretrained: bool = False, **kwargs: Any) -> PlainCnn:
    """Plain CIFAR net, 56 layers (n=9): 1 + 3x18 convs + FC."""
    return _create_plain_cifar(56, pretrained, **kwargs)


@register_model
def plain_cnn110(pretrained: bool = False, **kwargs: Any) -> PlainCnn:
    """Plain CIFAR net, 110 layers (n=18): 1 + 3x36 convs + FC."""
    return _create_plain_cifar(110, pretrained, **kwargs)


@register_model
def plain_cnn1202(pretrained: bool = False, **kwargs: Any) -> PlainCnn:
    """Plain CIFAR net, 1202 layers (n=200): 1 + 3x400 convs + FC."""
    return _create_plain_cifar(1202, pretrained, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """He et al.'s CIFAR ResNet-20 (3 basic blocks per stage, option-A shortcuts)."""
    return _create_resnet_cifar(20, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """He et al.'s CIFAR ResNet-32 (5 basic blocks per stage, option-A shortcuts)."""
    return _create_resnet_cifar(32, pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """He et al.'s CIFAR ResNet-44 (7 basic blocks per stage, option-A shortcuts)."""
    return _create_resnet_cifar(44, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """He et al.'s CIFAR ResNet-56 (9 basic blocks per stage, option-A shortcuts)."""
    return _create_resnet_cifar(56, pretrained, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """He et al.'s CIFAR ResNet-110 (18 basic blocks per stage, option-A shortcuts)."""
    return _create_resnet_cifar(110, pretrained, **kwargs)


@register_model
def cifar_resnet1202(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """He et al.'s CIFAR ResNet-1202 (200 basic blocks per stage, option-A shortcuts)."""
    return _create_resnet_cifar(1202, pretrained, **kwargs)


@register_model
def plain_cnn44_imagenet(pretrained: bool = False, **kwargs: Any) -> PlainCnn:
    """Plain ImageNet net, 44 layers: ResNet stem + 8/10/16/8 convs at 64/128/256/512 + FC."""
    return _create_plain_imagenet(44, pretrained, **kwargs)


@register_model
def plain_cnn110_imagenet(pretrained: bool = False, **kwargs: Any) -> PlainCnn:
    """Plain ImageNet net, 110 layers: ResNet stem + 10/13/75/10 convs at 64/128/256/512 + FC."""
    return _create_plain_imagenet(110, pretrained, **kwargs)
