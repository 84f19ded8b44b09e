"""The DeepSeekMoE layer (eq. 9): shared experts always on, plus gated top-k routed experts.

router -> permute -> grouped experts -> combine (``moe.dispatch``). The residual ``+ u_t`` of eq. 9 is added by
the decoder block. Shape legend: B batch, S sequence, T = B*S tokens, D hidden, E routed experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .. import kernels
from ..config import DeepseekMoEConfig
from ..ffn import SwiGLU
from .dispatch import dispatch, dispatch_reference, expert_counts
from .experts import ExpertList, GroupedExperts
from .losses import balance_losses
from .router import HashRouter, TopKRouter


@dataclass(frozen=True)
class RoutingOptions:
    """Inference-time changes to routing, for the paper's analyses (section 4.5 / 5).

    The defaults are the trained behaviour. Set them on a whole model with
    ``deepseek_moe.analyze.routing_options`` (a context manager) rather than by hand.
    """

    top_k: Optional[int] = None  # routed experts per token (None: the trained k); Fig. 5
    disable_top: int = 0  # mask each token's this many highest-scoring routed experts; Fig. 4
    disable_shared: bool = False  # skip the shared experts (pair with top_k = k + 1)

    @property
    def is_default(self) -> bool:
        return self.top_k is None and self.disable_top == 0 and not self.disable_shared


@dataclass
class MoEAux:
    """What an MoE layer reports besides its output; plain tensors, no autograd tricks."""

    expert_balance_loss: Optional[torch.Tensor]  # scalar, eq. 12 before alpha_1 (0 for fixed routing)
    device_balance_loss: Optional[torch.Tensor]  # scalar, eq. 15 before alpha_2
    tokens_per_expert: torch.Tensor  # [E] int64, assignments routed to each expert
    dropped_tokens: torch.Tensor  # scalar int64, assignments over capacity (0 when dropless)
    routing_entropy: Optional[torch.Tensor]  # scalar fp32, mean over tokens of H(s_t) in nats (0 for hash)
    # The three Optional ones are None when the forward was asked for no statistics.


class DeepseekMoE(nn.Module):
    def __init__(self, config: DeepseekMoEConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        E = config.n_routed_experts
        self.n_routed_experts = E
        self.top_k = config.num_experts_per_tok
        if config.router == "hash":
            self.gate: nn.Module = HashRouter(E, layer_idx)
        else:
            self.gate = TopKRouter(config.hidden_size, E, self.top_k, config.norm_topk_prob,
                                   config.routed_scaling_factor)
        self.experts = GroupedExperts(E, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts: Optional[SwiGLU] = None
        if config.n_shared_experts > 0:
            # Ks shared experts == one SwiGLU of Ks times the expert width (how the released
            # deepseek-moe-16b checkpoint stores them: mlp.shared_experts.{gate,up,down}_proj).
            self.shared_experts = SwiGLU(
                config.hidden_size, config.n_shared_experts * config.moe_intermediate_size
            )
        self.dispatch = config.dispatch
        self.routing = RoutingOptions()
        # D of eq. 15-17: routed experts in D contiguous groups. Expert parallelism sets it to its
        # size, so that the groups are the ranks that hold the experts.
        self.n_device_groups = config.n_device_groups

    def capacity(self, n_tokens: int) -> Optional[int]:
        if self.config.capacity_factor is None:
            return None
        return math.ceil(self.config.capacity_factor * n_tokens * self.top_k / self.n_routed_experts)

    def decode_args(self, norm: nn.Module) -> Optional[tuple]:
        """What ``kernels.moe_block`` takes of this layer and ``norm`` (the norm's weight and eps,
        the router's centroids, k, whether the gates are normalised, their scale, the experts'
        table and schemes), where the layer can take it: the trained routing, no capacity, shared
        experts, quantized experts the kernel serves, the norm's and router's kernels on; None
        elsewhere."""
        gate = self.gate
        if (not isinstance(gate, TopKRouter) or not gate.use_kernel or not self.routing.is_default
                or self.shared_experts is None or self.config.capacity_factor is not None
                or self.dispatch == "reference" or not isinstance(self.experts, ExpertList)
                or not getattr(norm, "use_kernel", False)):
            return None
        table = self.experts.expert_table(self.shared_experts)
        if table is None:
            return None
        k = gate.top_k
        return (norm.weight, norm.eps, gate.weight.detach(), k, gate.norm_topk_prob and k > 1,
                gate.routed_scaling_factor, *table)

    def decode_block(self, x_BSD: torch.Tensor, norm: nn.Module) -> Optional[tuple[torch.Tensor, MoEAux]]:
        """``x + self(norm(x))`` with no statistics (generation) in one operation of the package's
        kernels (``kernels.moe_block``: the norm, the routing, the routed and shared experts and
        the sums, the numbers of those steps) where a quantized bf16 model decodes one new token
        (``decode_args``, the norm's and router's kernels serving); None elsewhere."""
        if (x_BSD.shape[0] != 1 or x_BSD.shape[1] != 1 or x_BSD.dtype != torch.bfloat16
                or not getattr(norm, "use_kernel", False) or not norm._kernel_serves(x_BSD)
                or not kernels.cpu_routing_kernels(x_BSD)):
            return None
        args = self.decode_args(norm)
        if args is None:
            return None
        out, counts = kernels.moe_block(x_BSD, *args)
        return out, MoEAux(None, None, counts, torch.zeros((), dtype=torch.long), None)

    def forward(
        self, x_BSD: torch.Tensor, input_ids_BS: Optional[torch.Tensor] = None,
        valid_BS: Optional[torch.Tensor] = None, statistics: bool = True,
    ) -> tuple[torch.Tensor, MoEAux]:
        """``valid_BS``: the real tokens (None: all); padding is routed like any token but takes
        no part in the balance losses. ``statistics=False`` skips the balance losses and the
        routing entropy (generation, which needs neither: a few dozen small operations a layer
        per token)."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        ids_T = None if input_ids_BS is None else input_ids_BS.reshape(B * S)
        opts = self.routing
        if opts.is_default:
            r = self.gate(x_TD, ids_T, need_scores=statistics)
        else:
            r = self.gate(x_TD, ids_T, top_k=opts.top_k, disable_top=opts.disable_top)
        capacity = self.capacity(B * S)
        tokens_per_expert = expert_counts(r.topk_ids_TK, self.n_routed_experts)
        shared = None if opts.disable_shared else self.shared_experts
        # Decoding a quantized model: routed and shared experts in the same two kernel calls,
        # their sum rounded once.
        y_TD = (None if shared is None or capacity is not None or self.dispatch == "reference"
                else self.experts.few_tokens(x_TD, r.topk_ids_TK, r.topk_weights_TK, shared))
        if y_TD is not None:
            y_TD, dropped = y_TD.to(x_BSD.dtype), torch.zeros((), dtype=torch.long, device=x_TD.device)
        else:
            route = dispatch_reference if self.dispatch == "reference" else dispatch
            routed_TD, dropped = route(x_TD, r.topk_ids_TK, r.topk_weights_TK, self.experts, capacity,
                                       tokens_per_expert)
            y_TD = routed_TD.to(x_BSD.dtype)
            if shared is not None:
                y_TD = y_TD + shared(x_TD)

        if not statistics:
            return y_TD.view(B, S, D), MoEAux(None, None, tokens_per_expert, dropped, None)
        if r.scores_TE is None:
            zero = torch.zeros((), dtype=torch.float32, device=x_BSD.device)
            exp_loss, dev_loss, entropy = zero, zero, zero
        else:
            with torch.no_grad():
                # H(s_t) = sum_i -s log s (entr: 0 at s = 0), one pass over the scores
                if kernels.cpu_routing_kernels(r.scores_TE):
                    entropy = kernels.routing_entropy(r.scores_TE)
                else:
                    entropy = torch.special.entr(r.scores_TE).sum(-1).mean()
            exp_loss, dev_loss = balance_losses(
                r.scores_TE.view(B, S, -1),
                r.topk_ids_TK.view(B, S, -1),
                n_groups=self.n_device_groups,
                seq_aux=self.config.seq_aux,
                valid_BS=valid_BS,
            )
        aux = MoEAux(exp_loss, dev_loss, tokens_per_expert, dropped, entropy)
        return y_TD.view(B, S, D), aux


def moe_layers(module: nn.Module) -> list[DeepseekMoE]:
    """The MoE layers inside ``module`` (a whole model, wrapped or not), in module order."""
    return [m for m in module.modules() if isinstance(m, DeepseekMoE)]


def use_expert_list(model: nn.Module) -> None:
    """Give every MoE layer of ``model`` per-expert tensors (``ExpertList``) in place of its
    stacked experts, of the same shapes, dtype and device (a meta model stays on meta; the new
    tensors' values are fresh: load weights afterwards)."""
    for layer in moe_layers(model):
        if isinstance(layer.experts, ExpertList):
            continue
        w = layer.experts.w1
        E, I, D = w.shape
        with torch.device(w.device):
            layer.experts = ExpertList(E, D, I).to(w.dtype)
