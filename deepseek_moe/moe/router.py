"""Routers: which routed experts each token goes to, and with what gate weight.

Shape legend: T tokens, D hidden size, E routed experts, K routed experts per token.
Everything a router returns is fp32 whatever the model dtype: the logits and the softmax of
eq. 11 are computed in fp32, so the top-k choice and gate values of eq. 10 (and the balance
losses of eq. 12-17 built from the scores) do not depend on a bf16 model's rounding.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels


ROUTE_KERNEL_ROWS = 8  # at most this many tokens: a quantized model's routing may take the kernel


@dataclass
class RouterOutput:
    topk_ids_TK: torch.Tensor  # int64 expert ids, highest score first
    topk_weights_TK: torch.Tensor  # fp32 gate values g_{i,t} (eq. 10)
    scores_TE: Optional[torch.Tensor]  # fp32 softmax s_{i,t} (eq. 11); None for fixed routing


class TopKRouter(nn.Module):
    """Softmax top-k routing (eq. 10-11): DeepSeekMoE, Switch (k=1) and GShard (k=2).

    ``weight`` holds the expert centroids e_i, stored as ``mlp.gate.weight`` [E, D] in the
    released checkpoint. Top-k weights are the raw softmax scores (no renormalisation) unless
    ``norm_topk_prob``, times ``routed_scaling_factor`` (1: as published).
    """

    def __init__(self, hidden_size: int, n_experts: int, top_k: int, norm_topk_prob: bool,
                 routed_scaling_factor: float = 1.0):
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size))
        self._fp32: Optional[tuple[torch.Tensor, int, torch.Tensor]] = None  # (weight, version, copy)
        self.use_kernel = False  # decoding through kernels.route_tokens (quantized models)

    def _centroids_fp32(self) -> torch.Tensor:
        """The centroids in fp32. Without gradients (generation, evaluation) a bf16 model's are
        converted once and kept, not at every call; the copy is redone when the weight changes
        (another tensor, or an in-place write). The kept reference to the weight's storage means
        that no other tensor can take its address while the copy is kept."""
        w = self.weight
        if w.dtype == torch.float32 or torch.is_grad_enabled():
            return w.float()
        kept = self._fp32
        if (kept is None or kept[0].data_ptr() != w.data_ptr() or kept[0].shape != w.shape
                or kept[0].device != w.device or kept[1] != w._version):
            kept = self._fp32 = (w.detach(), w._version, w.detach().float())
        return kept[2]

    def forward(
        self,
        x_TD: torch.Tensor,
        input_ids_T: Optional[torch.Tensor] = None,
        top_k: Optional[int] = None,
        disable_top: int = 0,
        need_scores: bool = True,
    ) -> RouterOutput:
        """``top_k`` overrides the trained k; ``disable_top`` masks each token's highest-scoring
        experts before the top-k is taken (paper Fig. 4). Gate values stay the softmax scores over
        all experts, so with neither option this is exactly the trained routing.
        ``need_scores=False``: the caller reads no scores (generation), so that a quantized
        model's few tokens (``use_kernel``, which ``quant.quantize_modules`` sets) may take the
        package's one-operation routing (``kernels.route_tokens``: the same steps, the logits'
        sums in its own order), which gives none."""
        if (not need_scores and self.use_kernel and top_k is None and not disable_top
                and not torch.is_grad_enabled() and x_TD.shape[0] <= ROUTE_KERNEL_ROWS
                and kernels.cpu_routing_kernels(x_TD)):  # (fp32 logits, under autocast too)
            ids, gates = kernels.route_tokens(x_TD.contiguous(), self.weight.detach(), self.top_k,
                                              self.norm_topk_prob and self.top_k > 1, self.routed_scaling_factor)
            return RouterOutput(ids, gates, None)
        k = self.top_k if top_k is None else top_k
        if not 1 <= k <= self.n_experts - disable_top:
            raise ValueError(f"cannot route to {k} of {self.n_experts} experts with "
                             f"{disable_top} disabled")
        # fp32 under autocast too (which would run the product, and then the softmax, in bf16);
        # the context only where autocast is on (entering it costs more than a decoded token's
        # routing product)
        device = x_TD.device.type
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
            logits_TE = F.linear(x_TD.float(), self._centroids_fp32())
        scores_TE = logits_TE.softmax(dim=-1)
        if disable_top > 0:
            masked_TE = scores_TE.clone()
            masked_TE.scatter_(-1, torch.topk(scores_TE, disable_top, dim=-1).indices, -1.0)
            _, topk_ids_TK = torch.topk(masked_TE, k, dim=-1)
            topk_weights_TK = scores_TE.gather(-1, topk_ids_TK)
        elif kernels.cpu_routing_kernels(scores_TE):
            # The selection alone in the package's kernel; the gates gathered with their gradient.
            topk_ids_TK = kernels.topk_indices(scores_TE.detach(), k)
            topk_weights_TK = scores_TE.gather(-1, topk_ids_TK)
        else:
            topk_weights_TK, topk_ids_TK = torch.topk(scores_TE, k, dim=-1)
        if self.norm_topk_prob and k > 1:
            topk_weights_TK = topk_weights_TK / (topk_weights_TK.sum(-1, keepdim=True) + 1e-20)
        if self.routed_scaling_factor != 1:
            topk_weights_TK = topk_weights_TK * self.routed_scaling_factor
        return RouterOutput(topk_ids_TK, topk_weights_TK, scores_TE)

    def extra_repr(self) -> str:
        scale = "" if self.routed_scaling_factor == 1 else f", routed_scaling_factor={self.routed_scaling_factor:g}"
        return f"experts={self.n_experts}, top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob}{scale}"


class HashRouter(nn.Module):
    """Hash Layer routing (Roller et al. 2021): a fixed function of the token id, gate weight 1.

    Each layer salts the hash with its index so that layers route differently. No parameters,
    no balance loss (the assignment cannot be learned).
    """

    _MULT = 2654435761  # Knuth's multiplicative constant; ids < 2^31 keep the product in int64

    def __init__(self, n_experts: int, layer_idx: int = 0):
        super().__init__()
        self.n_experts = n_experts
        self.top_k = 1
        self.salt = (layer_idx + 1) * 0x9E37

    def expert_of(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = (input_ids.long() * self._MULT + self.salt) % (1 << 32)
        return (h >> 7) % self.n_experts

    def forward(
        self,
        x_TD: torch.Tensor,
        input_ids_T: Optional[torch.Tensor] = None,
        top_k: Optional[int] = None,
        disable_top: int = 0,
        need_scores: bool = True,  # (none to give: fixed routing)
    ) -> RouterOutput:
        if input_ids_T is None:
            raise ValueError("the hash router needs the token ids (input_ids)")
        if top_k not in (None, 1) or disable_top:
            raise ValueError("the hash router sends each token to exactly one fixed expert: it has "
                             "no scores to rank experts by, so k cannot change and none can be disabled")
        ids_TK = self.expert_of(input_ids_T).view(-1, 1)
        weights_TK = torch.ones(ids_TK.shape, dtype=torch.float32, device=x_TD.device)
        return RouterOutput(ids_TK, weights_TK, None)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, salt={self.salt}"
