"""Expert parallelism: each rank of an ``ep`` group holds ``E / ep`` consecutive routed experts.

Per MoE layer and micro-batch (P ranks in the group, E_l = E / P experts each):

1. sort this rank's token-expert assignments by expert; expert e lives on rank e // E_l, so the
   sorted rows are already grouped by destination rank;
2. exchange the per-expert counts (one small all_to_all_single), then the rows themselves
   (all_to_all_single with uneven split sizes, autograd-aware);
3. regroup the received rows by local expert and run the same grouped SwiGLU as one device;
4. send the outputs back the way they came, gate them and sum them into their tokens here.

The router, the gate weights and the balance losses stay on the token's own rank, so their
gradients are local; an expert's gradient arrives through the reverse all-to-all from every rank
that sent it tokens. With ``ep == 1`` the layer keeps its local dispatch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..model import DeepseekForCausalLM
from ..moe.experts import GroupedExperts, grouped_swiglu
from ..moe.layer import DeepseekMoE


def moe_layers(model: nn.Module) -> list[DeepseekMoE]:
    return [m for m in model.modules() if isinstance(m, DeepseekMoE)]


class ExpertParallelDispatch:
    """A drop-in for ``dispatch_sorted`` across an expert-parallel process group."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if n_experts % self.size:
            raise ValueError(f"{n_experts} experts do not split over {self.size} ranks")
        self.n_experts = n_experts
        self.local = n_experts // self.size

    def __call__(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 experts: GroupedExperts, capacity: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        from torch.distributed._functional_collectives import all_to_all_single_autograd as a2a

        if capacity is not None:
            raise ValueError("expert parallelism is dropless: capacity_factor must be None")
        T, D = x_TD.shape
        P, El = self.size, self.local
        ids_M = topk_ids_TK.reshape(-1)  # token-major: assignment a = t * K + k
        K = topk_ids_TK.shape[1]
        order_M = torch.argsort(ids_M, stable=True)
        token_M = order_M // K
        counts_E = torch.bincount(ids_M, minlength=self.n_experts)
        # recv_PE[q, e]: rows rank q sends to this rank's local expert e
        recv_PE = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_PE, counts_E, group=self.group)
        recv_PE = recv_PE.view(P, El)
        send_split = counts_E.view(P, El).sum(1).tolist()  # the host synchronisation of this layer
        recv_split = recv_PE.sum(1).tolist()

        x_send = x_TD.index_select(0, token_M)
        x_recv = a2a(x_send, recv_split, send_split, self.group)
        # Received rows come by source rank, each block sorted by local expert: sort by expert.
        local_R = torch.repeat_interleave(torch.arange(El, device=x_TD.device).repeat(P), recv_PE.reshape(-1))
        perm_R = torch.argsort(local_R, stable=True)
        w1, w3, w2 = experts.local_weights()
        y_sorted = grouped_swiglu(x_recv.index_select(0, perm_R), recv_PE.sum(0), w1, w3, w2)
        y_recv = torch.empty_like(y_sorted).index_copy(0, perm_R, y_sorted)
        y_back = a2a(y_recv, send_split, recv_split, self.group)
        gate_M = topk_weights_TK.reshape(-1).index_select(0, order_M)
        out_TD = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device)
        out_TD = out_TD.index_add(0, token_M, y_back.float() * gate_M.unsqueeze(1))
        return out_TD, torch.zeros((), dtype=torch.long, device=x_TD.device)


def apply_expert_parallel(model: DeepseekForCausalLM, mesh) -> None:
    """Shard every MoE layer's routed experts over ``mesh["ep"]`` (in place).

    Expert weights become DTensors on the 2-D ``(dp, ep)`` mesh, ``[Replicate(), Shard(0)]``:
    this rank keeps experts ``[r * E_l, (r + 1) * E_l)`` of its ep group. Every rank must hold the
    same full model before (same seed or same checkpoint). The device-level balance loss then
    groups experts by the rank that holds them (D = ep size).
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    P = mesh["ep"].size()
    r = mesh["ep"].get_local_rank()
    group = mesh["ep"].get_group()
    for layer in moe_layers(model):
        E = layer.n_routed_experts
        if E % P:
            raise ValueError(f"{E} routed experts cannot be split evenly over expert-parallel size {P}")
        El = E // P
        for name in ("w1", "w3", "w2"):
            full = getattr(layer.experts, name)
            if isinstance(full, DTensor):
                raise ValueError("the experts are already sharded")
            local = full.detach()[r * El:(r + 1) * El].clone()
            dt = DTensor.from_local(local, mesh, [Replicate(), Shard(0)], run_check=False)
            setattr(layer.experts, name, nn.Parameter(dt, requires_grad=full.requires_grad))
        layer.expert_groups = torch.arange(E, device=layer.experts.w1.device) // El
        layer.dispatcher = ExpertParallelDispatch(group, E) if P > 1 else None


def is_expert_param(name: str) -> bool:
    return ".mlp.experts." in name
