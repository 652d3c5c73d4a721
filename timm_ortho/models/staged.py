"""The building blocks of this package's networks and their common base, with timm's model API.

:class:`StagedCnn` is a stem, stages of blocks, global pooling and a linear classifier, with every
method a timm model has (``forward_features`` / ``forward_head``, ``reset_classifier``,
``forward_intermediates``, ``prune_intermediate_layers``, ``group_matcher``, gradient
checkpointing); a family chooses its block: :class:`ConvBnAct` (one parametric layer of a plain
chain) or :class:`BasicBlock` (He et al.'s CIFAR block with an option-A :class:`PadShortcut`).
The registered families are in :mod:`timm_ortho.models.plain_cnn`.
"""

# No ``from __future__ import annotations`` here: torch.fx copies a forward's annotations into the
# code it generates, and TorchScript cannot resolve them as strings (``Unknown type name``), which
# breaks fx + TorchScript. The annotations below are valid at runtime on Python >= 3.10.
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, get_act_layer, get_device_dtype
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from ..defaults import DEFAULT_INIT, InitScheme
from ..init import check_init_scheme, init_weights_
from ..shaping import tat_leaky_relu

__all__ = ["TAT_ACT", "BasicBlock", "ConvBnAct", "PadShortcut", "StagedCnn", "resolve_act_layer"]

TAT_ACT = "leaky_relu_tat"
"""``act_layer`` name of the depth-shaped leaky ReLU (its slope: :mod:`timm_ortho.shaping`)."""

StemType = Literal["cifar", "imagenet"]
_STEMS = ("cifar", "imagenet")


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

        self.feature_info = []
        reduction = self._build_stem(stem, in_chans, widths[0], act, dd)
        prev_chs = self._build_stages(depths, widths, reduction, act, dd)

        self.num_features = prev_chs
        self.head = ClassifierHead(prev_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.head_hidden_size = prev_chs  # no pre-logits layer: the pooled features

        self.init_weights(init)

    def _build_stem(
        self, stem: StemType, in_chans: int, chs: int, act: Callable[[], nn.Module], dd: dict
    ) -> int:
        """``stem`` and ``stem_pool``; returns the stem's total stride."""
        self.stem_is_feature = stem == "imagenet"
        if stem == "cifar":
            self.stem = ConvBnAct(in_chans, chs, 3, act_layer=act, **dd)
            self.stem_pool = nn.Identity()
            return 1
        self.stem = ConvBnAct(in_chans, chs, 7, stride=2, act_layer=act, **dd)
        # The stem output at stride 2 is a feature level, as in timm's ResNet (5 levels in all).
        self.feature_info.append(dict(num_chs=chs, reduction=2, module="stem"))
        self.stem_pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        return 4

    def _build_stages(
        self,
        depths: Sequence[int],
        widths: Sequence[int],
        reduction: int,
        act: Callable[[], nn.Module],
        dd: dict,
    ) -> int:
        """``stages`` (the first block of every stage but the first halves the map); returns the width."""
        stages: list[nn.Module] = []
        prev_chs = widths[0]
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
        return prev_chs

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
