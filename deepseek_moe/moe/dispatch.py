"""Token dispatch for eq. 9's routed sum, in three stages with narrow interfaces:

1. ``permute``: sort the token-expert assignments by expert; count them per expert; apply the
   capacity rule. Indices only, no rows are moved. The one place that states both rules below.
2. the experts stage, ``GroupedExperts.forward(x_MD, counts_E, gate_M)``: rows sorted by expert
   in, ``gate * SwiGLU_e(row)`` out, the gate scaling the input of the down projection. Its
   backends (``reference``, ``loop``, ``padded``, ``threaded``, ``grouped_mm``) live in
   ``moe.experts``; expert parallelism wraps exactly this stage (``parallel.expert_parallel``).
3. ``combine``: every gated row back to its token, summed in fp32, deterministically.

``dispatch`` runs the three. On the CPU the ``loop``, ``padded`` and ``threaded`` backends fuse
them into one autograd node (``GroupedExperts.routed_forward``) behind the same inputs and result.

Shape legend: T tokens, D hidden size, E routed experts, K experts per token, M = K*T
token-expert assignments.

**Assignment order.** Assignment ``a`` is numbered k-major (``a = k * T + t``), and rows are sorted
by expert stably, so within an expert every token's first choice comes before any token's second
choice, and within one choice earlier tokens come first.

**Capacity rule.** With a capacity C, expert e keeps the first C of its rows in that order (so
first choices have priority, as in GShard) and drops the rest. A dropped row keeps its place in
its expert's group with a gate of 0, so it contributes exactly 0 to the output and to every
gradient, and no shape depends on the data (no host synchronisation). ``dispatch_reference``
drops the same assignments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import kernels
from .experts import GroupedExperts, compute_dtype


@dataclass
class Permutation:
    """The permute stage's result: assignments sorted by expert (row m of the sorted order)."""

    order_M: torch.Tensor  # int64: the assignment a = k * T + t of each row
    token_M: torch.Tensor  # int64: the token t of each row
    gate_M: torch.Tensor  # fp32: the gate g_{i,t} of each row (eq. 10); 0 for a dropped row
    counts_E: torch.Tensor  # int64 [E]: rows per expert (dropped rows included)
    dropped: torch.Tensor  # int64 scalar: assignments over capacity (0 when dropless)
    n_tokens: int


def expert_counts(topk_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert, int64 [E]. On a GPU a scatter-add, not ``bincount``: the output
    size is fixed, so the GPU need not read the ids' maximum back to the host; on the CPU
    ``bincount`` (one operation instead of three: a decoded token counts in every MoE layer)."""
    ids = topk_ids.reshape(-1)
    if ids.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.bincount(ids, minlength=n_experts)
    return torch.zeros(n_experts, dtype=torch.long, device=ids.device).scatter_add_(
        0, ids, torch.ones_like(ids))


def permute(topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, n_experts: int,
            capacity: Optional[int] = None, counts_E: Optional[torch.Tensor] = None) -> Permutation:
    """Sort assignments by expert in k-major order and apply the capacity rule (module docstring).
    ``counts_E``: ``expert_counts`` of these ids, when the caller has it already."""
    T = topk_ids_TK.shape[0]
    ids_M = topk_ids_TK.t().reshape(-1)
    if kernels.cpu_routing_kernels(ids_M):  # a counting sort: the same result
        sorted_ids_M, order_M = kernels.sort_by_expert(ids_M, n_experts)
    else:
        sorted_ids_M, order_M = torch.sort(ids_M, stable=True)
    if counts_E is None:
        counts_E = expert_counts(ids_M, n_experts)
    gate_M = topk_weights_TK.t().reshape(-1).index_select(0, order_M)
    dropped = torch.zeros((), dtype=torch.long, device=ids_M.device)
    if capacity is not None:
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_M = torch.arange(ids_M.numel(), device=ids_M.device) - starts_E.index_select(0, sorted_ids_M)
        gate_M = torch.where(rank_M < capacity, gate_M, torch.zeros_like(gate_M))
        dropped = (counts_E - capacity).clamp(min=0).sum()
    return Permutation(order_M, order_M % T, gate_M, counts_E, dropped, T)


def combine(y_MD: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """Gated rows back to their tokens, summed in fp32 -> [T, D].

    Each row is first put back in assignment order (a gather through the inverse permutation, in
    the rows' own dtype), then the K rows of a token are summed with an fp32 accumulator. No
    atomics, so the result is the same on every run; no fp32 copy of the [K*T, D] rows.
    """
    M = perm.order_M.numel()
    T = perm.n_tokens
    inverse_M = torch.empty_like(perm.order_M).scatter_(
        0, perm.order_M, torch.arange(M, device=perm.order_M.device))
    return y_MD.index_select(0, inverse_M).view(M // T, T, -1).sum(0, dtype=torch.float32)


def dispatch(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
             experts: GroupedExperts, capacity: Optional[int] = None,
             counts_E: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """permute -> experts -> combine: ``(routed output fp32 [T, D], dropped assignments)``.
    Without a capacity, an experts stage that can take a few tokens' assignments unsorted
    (``few_tokens``: quantized decoding) does all three."""
    if capacity is None:
        y_TD = experts.few_tokens(x_TD, topk_ids_TK, topk_weights_TK)
        if y_TD is not None:
            return y_TD, torch.zeros((), dtype=torch.long, device=x_TD.device)
    perm = permute(topk_ids_TK, topk_weights_TK, experts.n_experts, capacity, counts_E)
    if x_TD.shape[0] == 0:
        return x_TD.new_zeros(x_TD.shape, dtype=torch.float32), perm.dropped
    if experts.fuses_dispatch(x_TD):
        return experts.routed_forward(x_TD, perm.token_M, perm.gate_M, perm.counts_E), perm.dropped
    x_TD = x_TD.to(compute_dtype(x_TD))  # gather the narrower rows
    y_MD = experts(x_TD.index_select(0, perm.token_M), perm.counts_E, perm.gate_M)
    return combine(y_MD, perm), perm.dropped


def dispatch_reference(
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    experts: GroupedExperts,
    capacity: Optional[int] = None,
    counts_E: Optional[torch.Tensor] = None,  # unused: the signature of ``dispatch``
) -> tuple[torch.Tensor, torch.Tensor]:
    """The readable per-expert loop, no permutation (slow; the pipeline is tested against it)."""
    T, D = x_TD.shape
    out_TD = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device)
    dropped = torch.zeros((), dtype=torch.long, device=x_TD.device)
    for e in range(experts.n_experts):
        # (k, t) pairs routed to e, first choices first.
        k_idx, t_idx = torch.where(topk_ids_TK.t() == e)
        if capacity is not None and len(t_idx) > capacity:
            dropped += len(t_idx) - capacity
            k_idx, t_idx = k_idx[:capacity], t_idx[:capacity]
        if len(t_idx) == 0:
            continue
        y_ND = experts.expert_forward(e, x_TD[t_idx])
        gate_N1 = topk_weights_TK[t_idx, k_idx].unsqueeze(1)
        out_TD = out_TD.index_add(0, t_idx, y_ND.float() * gate_N1)
    return out_TD, dropped
