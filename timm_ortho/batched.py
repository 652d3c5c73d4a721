"""The regularizer's gradient for many layers at once: one batched matmul pair per matrix shape.

For every filter bank the optimizer step needs ``(Wg Wg^T - I) Wg`` for each orthonormalized group
``Wg`` (see :mod:`timm_ortho.ortho`). Looping over layers launches two small matmuls per layer; a deep
plain net has dozens of layers of only a few distinct shapes. Here groups of equal shape
``(size, f_in)`` from all layers are stacked into one ``(B, size, f_in)`` batch and go through

    R = baddbmm(-I, W, W^T)        # W W^T - I, one kernel
    U = bmm(R, W)

so the cost is two kernels per distinct shape plus the copies that stack and unstack the weights.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .ortho import GroupLayout, compute_dtype, from_groups, gram_mean_abs_cosine, mean_abs_cosine, to_groups
from .targets import FilterBank

__all__ = ["BatchedOrthonormality"]


@dataclass(frozen=True)
class _Entry:
    bank: FilterBank
    layout: GroupLayout

    @property
    def blocks(self) -> int:
        return self.bank.conv_groups * self.layout.groups


class BatchedOrthonormality:
    """Batched ``(Wg Wg^T - I) Wg`` and ``||Wg Wg^T - I||_F^2`` over a fixed list of filter banks.

    Banks are bucketed by group shape ``(size, f_in)`` and compute dtype once; the device is read at
    call time, so the model may be moved (``model.to``, ``accelerator.prepare``) after construction.
    """

    def __init__(self, banks: Sequence[FilterBank]) -> None:
        self.entries = [_Entry(b, b.layout) for b in banks]
        buckets: dict[tuple[int, int, torch.dtype], list[int]] = defaultdict(list)
        for i, e in enumerate(self.entries):
            buckets[(e.layout.size, e.bank.f_in, compute_dtype(e.bank.param.dtype))].append(i)
        self.buckets = list(buckets.items())
        self._eye_cache: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
        self._workspaces: dict[tuple, dict[str, Tensor]] = {}

    def _blocks(self, i: int) -> Tensor:
        """Bank ``i``'s weight as ``(blocks, size, f_in)``, zero rows padding uneven groups."""
        e = self.entries[i]
        if e.layout.gather is None:
            # No padding: the blocks are the weight's rows in order, conv group then group then row,
            # so one reshape (a view) does what to_groups does; it runs for every bank every step.
            return e.bank.param.detach().reshape(e.blocks, e.layout.size, e.bank.f_in)
        w = to_groups(e.bank.matrix(e.bank.param.detach()), e.layout)
        return w.reshape(e.blocks, e.layout.size, e.bank.f_in)

    def _unblock(self, i: int, u: Tensor) -> Tensor:
        e = self.entries[i]
        if e.layout.scatter is None:  # no padding to drop: the inverse of _blocks' reshape
            return u.reshape(e.bank.param.shape)
        u = u.reshape(e.bank.conv_groups, e.layout.groups, e.layout.size, e.bank.f_in)
        return from_groups(u, e.layout).reshape(e.bank.param.shape)

    def _stacked(self, members: list[int], dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        blocks = [self._blocks(i) for i in members]
        if len(blocks) == 1:  # a lone weight is its own stack: no copy
            return blocks[0].to(dtype)
        if out is not None and all(b.dtype == dtype for b in blocks):
            return torch.cat(blocks, out=out)
        return torch.cat(blocks).to(dtype)

    def _eye(self, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (n, dtype, device)
        if key not in self._eye_cache:
            self._eye_cache[key] = torch.eye(n, dtype=dtype, device=device)
        return self._eye_cache[key]

    def _workspace(self, members: list[int], dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """Persistent stack/Gram/product buffers for one bucket, on the CPU only.

        On the CPU every large temporary is a fresh mapping whose pages fault in on first touch,
        which costs as much as the matmul's own memory traffic; CUDA's caching allocator already
        reuses blocks, so there the buffers would only pin memory.
        """
        key = (tuple(members), dtype, device)
        if key not in self._workspaces:
            if len(self._workspaces) >= 4 * len(self.buckets):
                # The selection changes from step to step (e.g. grads that come and go): don't hoard.
                self._workspaces.clear()
            e = self.entries[members[0]]
            b, s, d = sum(self.entries[i].blocks for i in members), e.layout.size, e.bank.f_in
            self._workspaces[key] = {
                "w": torch.empty(b, s, d, dtype=dtype, device=device),
                "r": torch.empty(b, s, s, dtype=dtype, device=device),
                "u": torch.empty(b, s, d, dtype=dtype, device=device),
            }
        return self._workspaces[key]

    def _groups_of(self, selected: Sequence[int] | None):
        """Yield ``(members, dtype, device)`` per bucket and device, restricted to ``selected``."""
        chosen = None if selected is None else set(selected)
        for (_size, _f_in, dtype), members in self.buckets:
            by_device: dict[torch.device, list[int]] = defaultdict(list)
            for i in members:
                if chosen is None or i in chosen:
                    by_device[self.entries[i].bank.param.device].append(i)
            for device, dev_members in by_device.items():
                yield dev_members, dtype, device

    @torch.no_grad()
    def residual_products(
        self,
        selected: Sequence[int] | None = None,
        coefficients: Sequence[float] | None = None,
        reuse_buffers: bool = False,
    ) -> dict[int, Tensor]:
        """``{i: c_i * (Wg Wg^T - I) Wg}`` shaped like bank ``i``'s weight, in the compute dtype.

        With ``c_i = 2 * lambda`` this is ``dR/dW``. ``selected`` limits the work to some banks and
        ``coefficients`` (aligned with ``selected``, default 1) scale each bank's result. The
        coefficient is folded into the Gram residual ``c * (W W^T - I)``, an ``s x s`` matrix, so it
        costs nothing on the ``s x f_in`` product. With ``reuse_buffers`` (the optimizer step) the
        results are views of persistent CPU buffers, valid until the next call.
        """
        coefficient = {} if coefficients is None else dict(zip(selected, coefficients, strict=True))
        out: dict[int, Tensor] = {}
        for members, dtype, device in self._groups_of(selected):
            ws = self._workspace(members, dtype, device) if reuse_buffers and device.type == "cpu" else {}
            w = self._stacked(members, dtype, ws.get("w"))
            sizes = [self.entries[i].blocks for i in members]
            cs = [coefficient.get(i, 1.0) for i in members]
            eye = self._eye(w.shape[1], dtype, device)
            # Autocast would run these matmuls in half precision; the method wants float32.
            with torch.autocast(device.type, enabled=False):
                uniform = all(c == cs[0] for c in cs)
                c0 = cs[0] if uniform else 1.0
                # beta * I + alpha * W W^T with beta = -c, alpha = c: c * (W W^T - I) in one kernel.
                r_out = {"out": ws["r"]} if ws else {}
                residual = torch.baddbmm(eye, w, w.transpose(1, 2), beta=-c0, alpha=c0, **r_out)
                if not uniform:
                    for part, c in zip(residual.split(sizes), cs, strict=True):
                        part.mul_(c)
                u = torch.bmm(residual, w, **({"out": ws["u"]} if ws else {}))
            for i, part in zip(members, u.split(sizes), strict=True):
                out[i] = self._unblock(i, part)
        return out

    @torch.no_grad()
    def squared_residuals(self) -> Tensor:
        """``||Wg Wg^T - I||_F^2`` summed over each bank's groups, one value per bank (float32).

        The penalty of bank ``i`` is ``lambda / 2`` times entry ``i``. Padding rows are removed.
        """
        return self._gram_statistics(cosine=False)[0]

    @torch.no_grad()
    def gram_statistics(self) -> tuple[Tensor, Tensor]:
        """:meth:`squared_residuals` and each bank's filter correlation, from one Gram per group.

        The correlation is the mean ``|cos|`` between distinct filters of a conv group, averaged
        over conv groups (float32, on the CPU). Where a bank is one group (``f_out <= f_in``) its
        Gram ``Wg Wg^T`` is the whole filter bank's, and the cosines are read off it
        (:func:`~timm_ortho.ortho.gram_mean_abs_cosine`); a fat bank's groups do not see each
        other's filters, so its cosines take a matmul of their own.
        """
        squared, cosines = self._gram_statistics(cosine=True)
        return squared, torch.stack([c.float().cpu() for c in cosines])

    def _gram_statistics(self, cosine: bool) -> tuple[Tensor, list[Tensor]]:
        values: list[Tensor | None] = [None] * len(self.entries)
        cosines: list[Tensor | None] = [None] * len(self.entries)
        for members, dtype, device in self._groups_of(None):
            w = self._stacked(members, dtype)
            with torch.autocast(device.type, enabled=False):
                gram = w @ w.transpose(1, 2)
            per_block = (gram - self._eye(w.shape[1], dtype, device)).square().sum(dim=(1, 2))
            sizes = [self.entries[i].blocks for i in members]
            parts = zip(members, per_block.split(sizes), gram.split(sizes), strict=True)
            for i, part, bank_gram in parts:
                e = self.entries[i]
                # Each conv group carries `pad` zero rows, and each adds exactly 1 (see ortho.py).
                values[i] = part.sum() - e.bank.conv_groups * e.layout.pad
                if cosine and e.layout.groups == 1:
                    cosines[i] = gram_mean_abs_cosine(bank_gram).mean()
                elif cosine:
                    cosines[i] = mean_abs_cosine(e.bank.matrix(e.bank.param.detach())).mean()
        devices = {v.device for v in values if v is not None}
        device = devices.pop() if len(devices) == 1 else torch.device("cpu")
        squared = torch.stack([v.to(device=device, dtype=torch.float32) for v in values])
        return squared, cosines
