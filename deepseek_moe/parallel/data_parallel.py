"""Data parallelism around expert parallelism: FSDP2 for the dense parts, summed expert gradients.

Each rank's loss is the mean over its own sequences, so the gradient of the global mean is the
mean over ranks. Dense parameters: FSDP2 (``fully_shard`` over all ranks, reduce-scatter with
averaging) or, without FSDP, an all-reduce average. Expert parameters: the reverse all-to-all
already summed the contributions of every rank of the ep group; an all-reduce over ``dp`` adds
the other groups, and dividing by the world size makes it the mean.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..moe.layer import moe_layers


def expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    return {p for layer in moe_layers(model) for p in layer.experts.parameters()}


def apply_fsdp(model: nn.Module, world_mesh) -> None:
    """FSDP2 over all ranks for every parameter except the (expert-parallel) routed experts:
    one unit per decoder layer, and the root for the embeddings, final norm and head."""
    from torch.distributed.fsdp import fully_shard

    experts = expert_parameters(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=world_mesh, ignored_params=experts & set(layer.parameters()))
    fully_shard(model, mesh=world_mesh, ignored_params=experts)


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters FSDP2 keeps after a forward with no backward (evaluation)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def sync_gradients(model: nn.Module, mesh, fsdp: bool) -> None:
    """Make every gradient the gradient of the mean loss over all ranks (see the module doc)."""
    world = dist.get_world_size()
    experts = expert_parameters(model)
    dp_group = mesh["dp"].get_group()
    dense: list[torch.Tensor] = []
    for p in model.parameters():
        if p.grad is None:
            continue
        if p in experts:
            g = _local(p.grad)
            if mesh["dp"].size() > 1:
                dist.all_reduce(g, group=dp_group)
            g.div_(world)
        elif not fsdp:
            dense.append(p.grad)
    if dense and world > 1:  # one flat all-reduce for all replicated dense gradients
        flat = torch.cat([g.reshape(-1) for g in dense])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in dense:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm over every gradient, whatever its sharding; scales them as
    ``torch.nn.utils.clip_grad_norm_`` does. Returns the norm (a plain tensor)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.zeros((), dtype=torch.float32)
    sharded: dict[tuple, list] = {}  # (mesh, sharded mesh dims) -> [mesh, dims, sum of squares]
    for g in grads:
        sq = _local(g).detach().float().pow(2).sum().cpu()
        placements = getattr(g, "placements", None)
        if placements is None:
            total += sq  # a replicated gradient: every rank holds all of it
            continue
        dims = tuple(i for i, pl in enumerate(placements) if pl.is_shard())
        sharded.setdefault((id(g.device_mesh), dims), [g.device_mesh, dims, torch.zeros(())])[2] += sq
    for mesh, dims, val in sharded.values():
        for d in dims:  # each shard holds a part: add the parts over that mesh dimension
            group = mesh.get_group(d)
            on_gpu = dist.get_backend(group) == "nccl"
            v = val.cuda() if on_gpu else val
            dist.all_reduce(v, group=group)
            val = v.cpu()
        total += val
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        _local(g).mul_(coef.to(_local(g).device, _local(g).dtype))
    return norm
