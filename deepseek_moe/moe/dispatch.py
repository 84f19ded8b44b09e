"""Token dispatch: send each token to its routed experts, run them, combine the gated outputs.

Shape legend: T tokens, D hidden size, E routed experts, K experts per token, M = K*T
token-expert assignments.

Assignment ``a`` is numbered k-major (``a = k * T + t``): when a capacity is set, every token's
first choice has priority over any token's second choice (as in GShard), and within one choice
earlier tokens come first. Both paths follow that rule, so they drop the same assignments.

Both return ``(out_TD fp32, dropped)`` where ``dropped`` is the number of assignments that did
not fit under ``capacity`` (0 when dropless).
"""

from __future__ import annotations

from typing import Optional

import torch

from .experts import GroupedExperts


def dispatch_reference(
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    experts: GroupedExperts,
    capacity: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The readable per-expert loop (slow; the fast path is tested against it)."""
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


def dispatch_sorted(
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    experts: GroupedExperts,
    capacity: Optional[int] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropless (unless ``capacity``) dispatch: sort assignments by expert, one grouped SwiGLU.

    No per-expert host synchronisation: ids are sorted and counted on the device. On CPU with the
    ``loop`` backend the gather, the experts, the gate and the combine run as one autograd node
    (``GroupedExperts.routed_forward``), whose combine is an ``index_add_`` (sequential over the
    index on CPU, so deterministic). Elsewhere the combine is a deterministic ``index_copy`` (each
    assignment has its own row) followed by a sum over K.
    """
    T, D = x_TD.shape
    K = topk_ids_TK.shape[1]
    E = experts.n_experts
    ids_M = topk_ids_TK.t().reshape(-1)
    order_M = torch.argsort(ids_M, stable=True)
    counts_E = torch.bincount(ids_M, minlength=E)
    dropped = torch.zeros((), dtype=torch.long, device=x_TD.device)
    if capacity is not None:
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_M = torch.arange(ids_M.numel(), device=ids_M.device) - starts_E[ids_M[order_M]]
        order_M = order_M[rank_M < capacity]
        kept_E = counts_E.clamp(max=capacity)
        dropped = (counts_E - kept_E).sum()
        counts_E = kept_E
    token_M = order_M % T
    gate_M = topk_weights_TK.t().reshape(-1).index_select(0, order_M)
    backend = experts.resolve_backend(x_TD, backend)
    # CUDA's index_add_ uses atomics, so GPUs keep the deterministic index_copy combine below.
    if backend == "loop" and x_TD.device.type == "cpu":
        return experts.routed_forward(x_TD, token_M, gate_M, counts_E), dropped
    y_MD = experts(x_TD.index_select(0, token_M), counts_E, backend=backend)
    y_MD = y_MD.float() * gate_M.unsqueeze(1)
    out_KTD = torch.zeros(K * T, D, dtype=torch.float32, device=x_TD.device)
    out_KTD = out_KTD.index_copy(0, order_M, y_MD).view(K, T, D)
    return out_KTD.sum(0), dropped
