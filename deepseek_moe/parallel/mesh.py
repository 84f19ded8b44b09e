"""Process-group start-up and the device mesh.

The mesh is 2-D, ``(dp, ep)`` with ``dp * ep = world``: ranks that share a ``dp`` index form an
expert-parallel group (they hold different experts and exchange tokens), ranks that share an
``ep`` index hold the same experts (their expert gradients are summed). Dense parameters are
replicated, or sharded over all ranks with FSDP2 (``fsdp=True``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..config import DeepseekMoEConfig


def env_world_size() -> int:
    """Processes launched together (torchrun sets WORLD_SIZE); 1 for a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class ParallelPlan:
    """How a run is laid out. ``world`` processes, ``ep`` of them per expert-parallel group."""

    world: int = 1
    ep: int = 1
    fsdp: bool = False

    @property
    def dp(self) -> int:
        return self.world // self.ep

    @property
    def distributed(self) -> bool:
        return self.world > 1 or self.ep > 1 or self.fsdp

    def validate(self, config: Optional[DeepseekMoEConfig] = None, launched: Optional[int] = None) -> None:
        """Clear errors before any work: sizes that do not divide, a mesh that does not match
        the processes launched, experts that cannot be split."""
        if self.ep < 1 or self.world < 1:
            raise ValueError(f"expert-parallel size ({self.ep}) and world size ({self.world}) must be >= 1")
        if config is not None and self.ep > 1:
            if not config.has_moe:
                raise ValueError(f"{config.name or 'the model'} is dense: there are no experts for "
                                 f"--expert-parallel {self.ep} to split")
            if config.n_routed_experts % self.ep:
                raise ValueError(f"{config.n_routed_experts} routed experts cannot be split evenly over "
                                 f"an expert-parallel size of {self.ep}")
        launched = env_world_size() if launched is None else launched
        if self.world != launched:
            raise ValueError(f"the mesh needs {self.world} processes but {launched} were launched "
                             f"(torchrun --nproc_per_node {self.world})")
        if self.ep > self.world:
            raise ValueError(f"expert-parallel size {self.ep} needs at least {self.ep} processes, but "
                             f"{self.world} {'was' if self.world == 1 else 'were'} launched: "
                             f"torchrun --nproc_per_node {self.ep} -m deepseek_moe train ...")
        if self.world % self.ep:
            raise ValueError(f"world size {self.world} is not a multiple of the expert-parallel size "
                             f"{self.ep}: the (dp, ep) mesh needs dp x ep = world")


def device_type(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Start the default process group when launched by torchrun (gloo on CPU, nccl on CUDA);
    returns ``(rank, world)``. Several ranks on few cores share them out (torch threads)."""
    world = env_world_size()
    if world == 1 and not dist.is_initialized():
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return dist.get_rank(), dist.get_world_size()


def build_mesh(plan: ParallelPlan, device: torch.device):
    """The 2-D ``(dp, ep)`` DeviceMesh, and a 1-D ``world`` mesh for FSDP2 over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    dt = device_type(device)
    mesh = init_device_mesh(dt, (plan.dp, plan.ep), mesh_dim_names=("dp", "ep"))
    world_mesh = init_device_mesh(dt, (plan.world,), mesh_dim_names=("world",))
    return mesh, world_mesh


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class Layout:
    """The training loop's view of the layout: rank, mesh and the few collectives it needs.
    With one plain process every method is a no-op (or returns its input)."""

    def __init__(self, plan: ParallelPlan, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self.active = plan.distributed
        self.rank, self.world = 0, 1
        self.mesh = self.world_mesh = None
        if self.active:
            if env_world_size() == 1 and not dist.is_initialized():  # --fsdp in one plain process
                dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            self.rank, self.world = init_distributed(device)
            self.mesh, self.world_mesh = build_mesh(plan, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _tensor(self, values) -> torch.Tensor:
        dev = self.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")
        return torch.as_tensor(values, dtype=torch.float64, device=dev)

    def mean(self, values: list[float]) -> list[float]:
        if not self.active or self.world == 1:
            return values
        t = self._tensor(values)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active and self.world > 1:
            dist.all_reduce(t)
        return t

    def max(self, value: float) -> float:
        if not self.active or self.world == 1:
            return value
        t = self._tensor([value])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0])

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (stop decisions must agree)."""
        return self.max(1.0 if flag else 0.0) > 0

    def barrier(self) -> None:
        if self.active and self.world > 1:
            dist.barrier()

    # -- the training loop's layout-dependent steps; plain calls for one process --
    def parallelize(self, model: torch.nn.Module, say=print) -> None:
        """Shard the routed experts over ``ep`` and, with FSDP2, the dense parameters over all ranks."""
        if not self.active:
            return
        from .data_parallel import apply_fsdp
        from .expert_parallel import apply_expert_parallel

        groups = model.config.n_device_groups
        if self.plan.ep > 1 and groups != self.plan.ep:
            say(f"device-level balance loss: experts grouped by their {self.plan.ep} "
                f"expert-parallel ranks (the config says n_device_groups={groups})")
        apply_expert_parallel(model, self.mesh)
        if self.plan.fsdp:
            apply_fsdp(model, self.world_mesh)
        say(f"layout: {self.world} processes, mesh dp={self.plan.dp} x ep={self.plan.ep}"
            f"{', FSDP2 for dense parameters' if self.plan.fsdp else ''}")

    def sync_gradients(self, model: torch.nn.Module) -> None:
        """Make every rank's gradients those of the global batch."""
        if self.active:
            from .data_parallel import sync_gradients

            sync_gradients(model, self.mesh, self.plan.fsdp)

    def clip_grad_norm_(self, model: torch.nn.Module, params: list, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm to ``max_norm``; returns the norm before clipping."""
        if self.active:
            from .data_parallel import clip_grad_norm_

            return clip_grad_norm_(params, max_norm)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def after_evaluation(self, model: torch.nn.Module) -> None:
        """FSDP2 leaves parameters gathered after a no-grad forward; shard them again."""
        if self.active and self.plan.fsdp:
            from .data_parallel import reshard

            reshard(model)

    def save_checkpoint(self, ckpt_root, step: int, model, optimizer, state: dict, *, keep: int,
                        extra_files: dict, save_weights=None):
        """A training checkpoint of this layout (sharded under torch.distributed, else whole;
        ``save_weights(model, folder)`` replaces how a whole one writes the weights)."""
        if self.active:
            if save_weights is not None:
                raise ValueError("this run's checkpoints (LoRA adapters) are single-process only")
            from .checkpoint import save_distributed_checkpoint

            return save_distributed_checkpoint(ckpt_root, step, model, optimizer, model.config, state,
                                               keep=keep, extra_files=extra_files)
        from ..train_state import save_training_checkpoint

        return save_training_checkpoint(ckpt_root, step, model, optimizer, state, keep=keep,
                                        extra_files=extra_files, save_weights=save_weights)

    def close(self) -> None:
        if self.active:
            destroy()
