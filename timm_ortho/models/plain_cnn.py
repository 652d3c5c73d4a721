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

Initialization is a creation argument: ``init="orthonormal"`` (default, the paper's: every conv and
linear weight gets orthonormal filters, group-wise where ``f_out > f_in``) or ``init="msra"`` (the
baseline: He et al.'s Kaiming-normal, fan-out, ReLU gain on every conv; the classifier keeps
PyTorch's default uniform init as in timm's ResNet). Both set BatchNorm to weight 1, bias 0 and all
biases to 0.
"""

# No ``from __future__ import annotations`` here: torch.fx copies a forward's annotations into the
# code it generates, and TorchScript cannot resolve them as strings (``Unknown type name``), which
# breaks fx + TorchScript. The annotations below are valid at runtime on Python >= 3.10.
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, get_act_layer, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from ..constants import CIFAR10_MEAN, CIFAR10_STD
from ..defaults import DEFAULT_INIT, INIT_SCHEMES, InitScheme
from ..init import check_init_scheme, init_weights_
from ..shaping import tat_leaky_relu

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

TAT_ACT = "leaky_relu_tat"
"""``act_layer`` name of the depth-shaped leaky ReLU (its slope: :mod:`timm_ortho.shaping`)."""

StemType = Literal["cifar", "imagenet"]
_STEMS = ("cifar", "imagenet")

_METHOD_PAPER = "arXiv:1703.01827"
_RESNET_PAPER = "arXiv:1512.03385"
_METHOD_PAPER_NAME = (
    "All You Need is Beyond a Good Init: Exploring Better Solution for Training Extremely Deep "
    "Convolutional Neural Networks with Orthonormality and Modulation"
)


class ConvBnAct(nn.Module):
    """One parametric layer of the chain: ``conv (no bias) -> BatchNorm -> activation`` (ReLU by default).

    Built from plain ``torch.nn`` leaves so that ``torch.fx`` traces it as three nodes. The ReLU is
    not in-place: the method hooks layer outputs, and an in-place activation breaks
    ``register_full_backward_hook`` and rewrites tensors that a hook may have kept.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, bias=False, **dd
        )
        self.bn = nn.BatchNorm2d(out_chs, **dd)
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class PadShortcut(nn.Module):
    """He et al.'s option-A shortcut: subsample by ``stride``, append zero channels up to ``out_chs``.

    Parameter-free, so a residual net has exactly the parametric layers of its plain twin. Sampling
    every ``stride``-th pixel from the first one matches the output grid of the block's
    ``3x3, stride s, padding 1`` conv, for odd and even map sizes alike.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        if out_chs < in_chs:
            raise ValueError(f"option-A shortcut can only add channels, got {in_chs} -> {out_chs}")
        self.stride = stride
        self.pad = out_chs - in_chs

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))
        return x


class BasicBlock(nn.Module):
    """He et al.'s CIFAR basic block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    convs = 2

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(out_chs, **dd)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.shortcut = (
            PadShortcut(in_chs, out_chs, stride) if stride > 1 or out_chs != in_chs else nn.Identity()
        )
        self.act2 = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.shortcut(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class StagedCnn(nn.Module):
    """A stem, stages of blocks, global pooling and a linear classifier, with timm's model API.

    Module names: ``stem.conv`` (timm's ``first_conv``), ``stages.<i>.<j>`` (block ``j`` of stage
    ``i``), ``head.fc`` (timm's ``classifier``). Subclasses choose the block (:attr:`block_cls`).

    Args:
        depths: blocks per stage.
        widths: output channels per stage; the stem has ``widths[0]`` filters.
        stem: ``"cifar"`` (3x3 conv, stride 1) or ``"imagenet"`` (7x7/2 conv + 3x3/2 max pool).
        num_classes: classifier outputs; 0 for no classifier.
        in_chans: input image channels.
        global_pool: timm pooling type (``"avg"``, ``"max"``, ...; ``""`` for none).
        drop_rate: dropout before the classifier.
        init: ``"orthonormal"`` (default) or ``"msra"``, see :func:`timm_ortho.init_weights_`.
        act_layer: the activation of every layer, in timm's convention: a name that
            ``timm.layers.get_act_layer`` knows (``"relu"``, ``"leaky_relu"``, ``"gelu"``, ...), a class
            or a no-argument callable, or ``"leaky_relu_tat"``: a leaky ReLU whose slope is derived
            from the number of activations in the chain by TAT's criterion (see
            :mod:`timm_ortho.shaping`). ``None``: the family's default (:attr:`default_act`).
    """

    block_cls: type[nn.Module] = ConvBnAct
    convs_per_block: int = 1
    default_act: str = "relu"
    __jit_unused_properties__ = ["num_layers"]  # noqa: RUF012  (TorchScript reads this class attribute)

    def __init__(
        self,
        depths: Sequence[int],
        widths: Sequence[int],
        stem: StemType = "cifar",
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        init: InitScheme = DEFAULT_INIT,
        act_layer: str | Callable[[], nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(depths) != len(widths) or not depths:
            raise ValueError(
                f"need one width per stage and at least one stage, got depths={tuple(depths)} and "
                f"widths={tuple(widths)}"
            )
        if any(d < 1 for d in depths) or any(w < 1 for w in widths):
            raise ValueError(f"depths and widths must be positive, got {tuple(depths)} and {tuple(widths)}")
        if stem not in _STEMS:
            raise ValueError(f"unknown stem {stem!r}: choose one of {_STEMS}")
        check_init_scheme(init)
        dd = {"device": device, "dtype": dtype}
        # Activations along the longest path: the stem's and every conv's of every block.
        act = resolve_act_layer(
            self.default_act if act_layer is None else act_layer, 1 + sum(depths) * self.convs_per_block
        )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.init_scheme = init
        self.grad_checkpointing = False

        stem_chs = widths[0]
        self.feature_info = []
        if stem == "cifar":
            self.stem = ConvBnAct(in_chans, stem_chs, 3, act_layer=act, **dd)
            self.stem_pool = nn.Identity()
            reduction = 1
        else:
            self.stem = ConvBnAct(in_chans, stem_chs, 7, stride=2, act_layer=act, **dd)
            # The stem output at stride 2 is a feature level, as in timm's ResNet (5 levels in all).
            self.feature_info.append(dict(num_chs=stem_chs, reduction=2, module="stem"))
            self.stem_pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            reduction = 4
        self.stem_is_feature = stem == "imagenet"

        stages: list[nn.Module] = []
        prev_chs = stem_chs
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [
                self.block_cls(
                    prev_chs if j == 0 else width, width, stride=stride if j == 0 else 1, act_layer=act, **dd
                )
                for j in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{i}"))
            prev_chs = width
        self.stages = nn.Sequential(*stages)

        self.num_features = prev_chs
        self.head = ClassifierHead(prev_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.head_hidden_size = prev_chs  # no pre-logits layer: the pooled features

        self.init_weights(init)

    @torch.jit.ignore
    def init_weights(self, init: InitScheme = DEFAULT_INIT) -> None:
        """(Re)initialize every layer: convs and linears by ``init``, BatchNorm to weight 1, bias 0."""
        init_weights_(self, init)
        self.init_scheme = init
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d) and not m.weight.is_meta:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_layers(self) -> int:
        """Parametric layers (convs + classifier) as in the model's name: stem + body + FC."""
        body = sum(len(stage) for stage in self.stages) * self.convs_per_block
        return 1 + body + int(isinstance(self.head.fc, nn.Linear))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier with ``num_classes`` outputs (0: none), initialized with the model's scheme.

        ``global_pool=None`` keeps the pooling; ``""`` removes it (then the head returns the unpooled map).
        """
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))
        self.head_hidden_size = self.num_features
        if isinstance(self.head.fc, nn.Linear):
            init_weights_(self.head.fc, self.init_scheme)

    def _run_stage(self, stage: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Forward features and return the feature levels of :attr:`feature_info` along the way.

        Args:
            indices: last n levels if int, all if None, the listed levels if a sequence.
            norm: unused (there is no final norm).
            stop_early: stop after the last requested level.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of intermediates.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        offset = 1 if self.stem_is_feature else 0
        intermediates: list[Tensor] = []

        x = self.stem(x)
        if self.stem_is_feature and 0 in take_indices:
            intermediates.append(x)
        x = self.stem_pool(x)
        stages = self.stages
        if stop_early and not torch.jit.is_scripting():
            stages = self.stages[: max_index - offset + 1]
        for i, stage in enumerate(stages):
            x = self._run_stage(stage, x)
            if i + offset in take_indices:
                intermediates.append(x)

        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the layers after the last level in ``indices`` (and the head); returns the kept levels."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        offset = 1 if self.stem_is_feature else 0
        keep_stages = max_index - offset + 1
        self.stages = self.stages[:keep_stages]
        if keep_stages == 0:
            self.stem_pool = nn.Identity()
        prune_end = max_index < len(self.feature_info) - 1
        if prune_end:
            self.num_features = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.num_classes = 0
            self.head.reset(0, "", in_features=self.num_features, **get_device_dtype(self))
            self.head_hidden_size = self.num_features
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """The unpooled feature map of the last stage."""
        x = self.stem(x)
        x = self.stem_pool(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


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


def resolve_act_layer(
    act_layer: str | Callable[[], nn.Module], num_activations: int
) -> Callable[[], nn.Module]:
    """The activation factory for a chain of ``num_activations`` activations (see :class:`StagedCnn`)."""
    if act_layer == TAT_ACT:
        return tat_leaky_relu(num_activations)
    if isinstance(act_layer, str):
        resolved = get_act_layer(act_layer)
        if resolved is None:
            raise ValueError(f"unknown act_layer {act_layer!r}: use a timm activation name or {TAT_ACT!r}")
        return resolved
    if not callable(act_layer):
        raise TypeError(f"act_layer must be a name, a class or a callable, got {type(act_layer).__name__}")
    return act_layer


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
