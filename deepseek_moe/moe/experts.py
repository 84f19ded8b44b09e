"""Routed experts stored stacked, and the grouped SwiGLU computation over tokens sorted by expert.

Shape legend: E experts, D hidden size, I expert intermediate size, M token-expert assignments
(rows of the sorted input, grouped by expert, ``counts_E`` rows per expert).

Weights are stacked parameters (``w1`` = gate_proj [E, I, D], ``w3`` = up_proj [E, I, D],
``w2`` = down_proj [E, D, I]); the checkpoint converter splits them into the released
per-expert tensors. Three ways to compute the same thing:

- ``expert_forward(e, x)``: one expert, plain autograd. The readable reference uses it.
- ``grouped_mm``: ``torch.nn.functional.grouped_mm`` with offsets; no host synchronisation at
  all, the right choice on GPUs.
- ``loop``: a hand-written autograd function that runs one GEMM per expert into slices of
  preallocated buffers and writes the weight gradients straight into the stacked gradient.
  Indexing ``w[e]`` inside autograd would make every backward allocate a full [E, ...] gradient
  per expert (../shared/MEASURED.md: 8x slower training on CPU); this avoids it. It reads the
  per-expert counts once per call (one host synchronisation per layer, not per expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _LoopGroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MD, w1_EID, w3_EID, w2_EDI, counts):  # type: ignore[override]
        M = x_MD.shape[0]
        I = w1_EID.shape[1]
        D = w2_EDI.shape[1]
        g_MI = x_MD.new_empty(M, I)
        u_MI = x_MD.new_empty(M, I)
        for e, (s, n) in enumerate(_spans(counts)):
            if n:
                torch.mm(x_MD[s : s + n], w1_EID[e].t(), out=g_MI[s : s + n])
                torch.mm(x_MD[s : s + n], w3_EID[e].t(), out=u_MI[s : s + n])
        h_MI = F.silu(g_MI).mul_(u_MI)
        out_MD = x_MD.new_empty(M, D)
        for e, (s, n) in enumerate(_spans(counts)):
            if n:
                torch.mm(h_MI[s : s + n], w2_EDI[e].t(), out=out_MD[s : s + n])
        ctx.save_for_backward(x_MD, w1_EID, w3_EID, w2_EDI, g_MI, u_MI)
        ctx.counts = counts
        return out_MD

    @staticmethod
    def backward(ctx, grad_MD):  # type: ignore[override]
        x_MD, w1, w3, w2, g_MI, u_MI = ctx.saved_tensors
        counts = ctx.counts
        grad_MD = grad_MD.contiguous()
        spans = list(_spans(counts))
        sig_MI = torch.sigmoid(g_MI)
        silu_MI = g_MI * sig_MI
        h_MI = silu_MI * u_MI
        dh_MI = torch.empty_like(g_MI)
        gw2 = torch.zeros_like(w2) if ctx.needs_input_grad[3] else None
        for e, (s, n) in enumerate(spans):
            if n:
                torch.mm(grad_MD[s : s + n], w2[e], out=dh_MI[s : s + n])
                if gw2 is not None:
                    torch.mm(grad_MD[s : s + n].t(), h_MI[s : s + n], out=gw2[e])
        del h_MI
        du_MI = dh_MI * silu_MI
        # d silu(g) / dg = sig * (1 + g * (1 - sig))
        dg_MI = dh_MI.mul_(u_MI).mul_(sig_MI * (1 + g_MI * (1 - sig_MI)))
        gx = torch.empty_like(x_MD) if ctx.needs_input_grad[0] else None
        gw1 = torch.zeros_like(w1) if ctx.needs_input_grad[1] else None
        gw3 = torch.zeros_like(w3) if ctx.needs_input_grad[2] else None
        for e, (s, n) in enumerate(spans):
            if not n:
                continue
            xs, dg, du = x_MD[s : s + n], dg_MI[s : s + n], du_MI[s : s + n]
            if gw1 is not None:
                torch.mm(dg.t(), xs, out=gw1[e])
            if gw3 is not None:
                torch.mm(du.t(), xs, out=gw3[e])
            if gx is not None:
                torch.mm(dg, w1[e], out=gx[s : s + n])
                gx[s : s + n].addmm_(du, w3[e])
        return gx, gw1, gw3, gw2, None


def _spans(counts: list[int]):
    s = 0
    for n in counts:
        yield s, n
        s += n


class GroupedExperts(nn.Module):
    """``n_experts`` SwiGLU experts of width ``intermediate_size``, stored stacked."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))  # gate
        self.w3 = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))  # down

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on ``x_ND`` with plain autograd (the readable reference)."""
        return F.linear(F.silu(F.linear(x_ND, self.w1[e])) * F.linear(x_ND, self.w3[e]), self.w2[e])

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """Rows of ``x_MD`` sorted by expert, ``counts_E[e]`` rows for expert ``e`` -> [M, D]."""
        if backend == "auto":
            backend = "grouped_mm" if x_MD.is_cuda and x_MD.dtype == torch.bfloat16 else "loop"
        if backend == "loop":
            counts = counts_E.tolist()  # the one host synchronisation of this path
            return _LoopGroupedSwiGLU.apply(x_MD, self.w1, self.w3, self.w2, counts)
        if backend == "grouped_mm":
            offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
            g = F.grouped_mm(x_MD, self.w1.transpose(-2, -1), offs=offs)
            u = F.grouped_mm(x_MD, self.w3.transpose(-2, -1), offs=offs)
            return F.grouped_mm(F.silu(g) * u, self.w2.transpose(-2, -1), offs=offs)
        raise ValueError(f"unknown grouped-experts backend {backend!r}")

    def extra_repr(self) -> str:
        E, I, D = self.w1.shape
        return f"experts={E}, hidden={D}, intermediate={I}"
