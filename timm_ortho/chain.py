"""Whether a model is a *plain chain*: one path from the image to the output, no shortcut, no branch.

The method's two stabilizers for depth, the step bound and the error modulation, are what a deep
Conv-BN-activation chain needs and what a residual net, a MobileNet or a ViT does not
(``docs/results.md``, "Any timm model"): there they slow training. ``"auto"`` turns them on for plain
chains only, and this module decides which models those are, from the model itself.

The test is on the autograd graph of one forward pass. Let ``x`` be the input (a leaf that requires
grad) and call a node of the graph *active* if ``x`` reaches it, i.e. the error at that node depends
on the image. The model is a plain chain iff no active node has two or more distinct active inputs:

- a residual add ``f(x) + x``, a concatenation of branches, a squeeze-and-excitation product
  ``x * g(x)`` and an attention product all have two active inputs;
- a conv, a linear layer, BatchNorm, an activation, pooling, dropout and reshapes have one (their
  weights, biases and buffers are not active: they do not depend on the image).

On a plain chain the backward pass is one path, so the error reaching a layer is exactly the error
of the layer above it propagated through the layers in between: the setting of the paper's
quasi-isometry argument and of :func:`~timm_ortho.modulation_rule.simulate_chain`.

The forward runs once, on a batch of two random inputs, with every module in eval mode (no running
statistic changes) and each module's mode restored afterwards. Its channels come from the first target
layer (``in_features`` for a linear one); a small spatial size (32 per side) is tried first, since the
structure of a conv net does not depend on it, then the size a patch embedding is fixed to
(``model.patch_embed.img_size``, timm's ViTs) and the timm ``pretrained_cfg["input_size"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .targets import find_targets

__all__ = ["ChainCheck", "check_plain_chain"]

_MODULATE_NODE = "ModulateBackward"
"""The backward node of :class:`timm_ortho.modulation_function.Modulate`: its first input is the layer's
output, its second the token that threads the chain's state (when a modulation is already installed)."""


@dataclass(frozen=True)
class ChainCheck:
    """The answer of :func:`check_plain_chain`."""

    plain: bool
    """True when the model is one path from input to output (see the module docstring)."""
    reason: str
    """Why, in words a log line can show: where the first branch is, or why no forward ran."""
    traced: bool = True
    """False when no forward pass could be run: then ``plain`` is False for want of evidence."""


def check_plain_chain(model: nn.Module, example: Tensor | None = None) -> ChainCheck:
    """Whether ``model`` is a plain chain, from the autograd graph of one forward pass.

    Args:
        model: the model (left as it was: parameters, buffers and each module's train/eval mode).
        example: an input batch to trace with; by default random inputs shaped from the model (see the
            module docstring).

    Returns a :class:`ChainCheck`; a model whose forward fails on every input tried is reported as
    not a plain chain (``traced=False``) with the error in ``reason``.
    """
    inputs = [example] if example is not None else _example_inputs(model)
    if not inputs:
        return ChainCheck(False, "no Conv/Linear layer to shape an input from", traced=False)
    errors = []
    for batch in inputs:
        x = batch.detach().requires_grad_(True)
        try:
            output = _traced_forward(model, x)
        except Exception as e:  # a wrong guess at the input shape, a model that needs kwargs, ...
            errors.append(f"{tuple(x.shape)}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        return _check_graph(output, x)
    return ChainCheck(False, "no forward pass ran (" + "; ".join(errors) + ")", traced=False)


def _traced_forward(model: nn.Module, example: Tensor) -> Tensor | None:
    """The model's output on ``example`` (a leaf that requires grad), every module in eval mode."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.enable_grad(), torch.autocast(example.device.type, enabled=False):
            output = model(example)
    finally:
        for module, training in modes:
            module.training = training
    outputs = output if isinstance(output, (list, tuple)) else [output]
    tensors = [t for t in outputs if isinstance(t, Tensor) and t.grad_fn is not None]
    return tensors[0] if len(tensors) == 1 else None


def _check_graph(output: Tensor | None, x: Tensor) -> ChainCheck:
    if output is None:
        return ChainCheck(False, "the forward pass returns no single differentiable tensor")
    order = _post_order(output.grad_fn)
    active: set[torch.autograd.graph.Node] = set()
    for node in order:  # every node after its inputs
        if getattr(node, "variable", None) is x:
            active.add(node)
            continue
        children = node.next_functions
        if node.name() == _MODULATE_NODE:  # the modulation's token links its layers, not a path of the model
            children = children[:1]
        inputs = {child for child, _ in children if child is not None and child in active}
        if len(inputs) > 1:
            return ChainCheck(False, f"a branch: {node.name()} joins {len(inputs)} paths from the input")
        if inputs:
            active.add(node)
    if output.grad_fn not in active:
        return ChainCheck(False, "the output does not depend on the input")
    return ChainCheck(True, "one path from the input to the output (no shortcut, no branch)")


def _post_order(root: torch.autograd.graph.Node) -> list[torch.autograd.graph.Node]:
    """The graph's nodes, each after all of its inputs. Iterative: a 1202-layer chain is deeper than
    Python's recursion limit."""
    order: list[torch.autograd.graph.Node] = []
    expanded: set[torch.autograd.graph.Node] = set()
    stack: list[tuple[torch.autograd.graph.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in expanded:
            continue
        expanded.add(node)
        stack.append((node, True))
        stack.extend((c, False) for c, _ in node.next_functions if c is not None and c not in expanded)
    return order


def _example_inputs(model: nn.Module) -> list[Tensor]:
    """Random batches of two to trace with: a small spatial size first, then the cfg's input size."""
    targets = find_targets(model)
    weight = next((p for p in model.parameters()), None)
    if not targets or weight is None:
        return []
    dd = dict(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else torch.float32)
    first = targets[0].module
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(first, nn.Linear):
        return [torch.randn(2, first.in_features, **dd)]
    spatial = first.weight.dim() - 2
    channels = first.in_channels
    sizes = [(32,) * spatial]
    # A model made for another size than its cfg's (timm's img_size=...) keeps it on its patch embedding.
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    size = cfg.get("input_size")
    for candidate in (fixed, size[1:] if size is not None and len(size) == spatial + 1 else None):
        if candidate is not None and len(candidate) == spatial and tuple(candidate) not in sizes:
            sizes.append(tuple(candidate))
    return [torch.randn(2, channels, *s, **dd) for s in sizes]
