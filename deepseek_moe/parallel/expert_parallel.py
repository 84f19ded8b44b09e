"""Expert parallelism: each rank of an ``ep`` group holds ``E / ep`` consecutive routed experts.

It wraps only the experts stage of the dispatch pipeline (``moe.dispatch``): the router, the
permutation (with its capacity rule), the combine and the balance losses run on the token's own
rank, unchanged. Around ``GroupedExperts.forward(x_MD, counts_E, gate_M)`` (P ranks in the group,
E_l = E / P experts each), forward hooks

1. exchange the per-expert counts (one small ``all_to_all_single``); rows sorted by expert are
   already grouped by destination rank, since expert e lives on rank e // E_l;
2. send the rows and their gates to their expert's rank (``all_to_all_single`` with uneven
   split sizes, autograd-aware) and regroup what arrives by local expert;
3. let the stage run its own backend on the local experts;
4. send the outputs back the way they came, in the order the stage was given them.

An expert's gradient arrives through the reverse all-to-all from every rank that sent it rows.
The split sizes are read on the host (all-to-all needs them). With ``ep == 1`` no hook is
installed, so the layer is the local path bit for bit by construction.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..model import DeepseekForCausalLM
from ..moe.experts import GroupedExperts
from ..moe.layer import moe_layers


class ExpertParallel:
    """The all-to-all around one ``GroupedExperts`` stage (installed by ``apply_expert_parallel``)."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        if n_experts % self.size:
            raise ValueError(f"{n_experts} experts do not split over {self.size} ranks")
        self.local = n_experts // self.size
        # What the output hook needs from the input hook of the same call.
        self._pending: Optional[tuple[torch.Tensor, list[int], list[int]]] = None

    def install(self, experts: GroupedExperts) -> None:
        experts.register_forward_pre_hook(self._send)
        experts.register_forward_hook(self._return)

    def _send(self, module: GroupedExperts, args: tuple) -> tuple:
        from torch.distributed._functional_collectives import all_to_all_single_autograd as a2a

        x_MD, counts_E, gate_M = args
        P, El = self.size, self.local
        # recv_PE[q, e]: rows rank q sends to this rank's local expert e
        recv_PE = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_PE, counts_E, group=self.group)
        recv_PE = recv_PE.view(P, El)
        send_split = counts_E.view(P, El).sum(1).tolist()
        recv_split = recv_PE.sum(1).tolist()
        x_recv = a2a(x_MD, recv_split, send_split, self.group)
        gate_recv = a2a(gate_M, recv_split, send_split, self.group)
        # Received rows come by source rank, each block sorted by local expert: sort by expert.
        local_R = torch.repeat_interleave(torch.arange(El, device=x_MD.device).repeat(P), recv_PE.reshape(-1))
        perm_R = torch.argsort(local_R, stable=True)
        self._pending = (perm_R, send_split, recv_split)
        return x_recv.index_select(0, perm_R), recv_PE.sum(0), gate_recv.index_select(0, perm_R)

    def _return(self, module: GroupedExperts, args: tuple, y_sorted: torch.Tensor) -> torch.Tensor:
        from torch.distributed._functional_collectives import all_to_all_single_autograd as a2a

        assert self._pending is not None
        perm_R, send_split, recv_split = self._pending
        self._pending = None
        y_recv = torch.empty_like(y_sorted).index_copy(0, perm_R, y_sorted)
        return a2a(y_recv, send_split, recv_split, self.group)


def apply_expert_parallel(model: DeepseekForCausalLM, mesh) -> None:
    """Shard every MoE layer's routed experts over ``mesh["ep"]`` (in place).

    Expert weights become DTensors on the 2-D ``(dp, ep)`` mesh, ``[Replicate(), Shard(0)]``:
    this rank keeps experts ``[r * E_l, (r + 1) * E_l)`` of its ep group. Every rank must hold the
    same full model before (same seed or same checkpoint). The device-level balance loss then
    groups experts by the rank that holds them (D = ep size). Capacity works as on one process:
    each rank applies the rule to its own tokens before anything is sent.
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
        if not isinstance(layer.experts, GroupedExperts):
            raise ValueError("expert parallelism shards stacked experts; this model holds one tensor per "
                             "expert (load it with experts=\"stacked\")")
        for name in ("w1", "w3", "w2"):
            full = getattr(layer.experts, name)
            if isinstance(full, DTensor):
                raise ValueError("the experts are already sharded")
            local = full.detach()[r * El:(r + 1) * El].clone()
            dt = DTensor.from_local(local, mesh, [Replicate(), Shard(0)], run_check=False)
            setattr(layer.experts, name, nn.Parameter(dt, requires_grad=full.requires_grad))
        if P > 1:
            layer.n_device_groups = P
            ExpertParallel(group, E).install(layer.experts)
