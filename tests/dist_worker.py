"""Run under torchrun by tests/test_distributed.py: a parallel run against a single-process one.

    torchrun --nproc_per_node N tests/dist_worker.py --ep E [--fsdp] [--capacity F] --out result.json

Every rank builds the same model (same seed), applies the layout, and takes 5 AdamW steps on
its slice of a fixed global batch. Rank 0 also runs the plain single-process model on the whole
batch (with a capacity factor: on each rank's slice in turn, accumulating gradients, since the
capacity is per forward's tokens) and writes the largest differences (losses, device-level balance loss, parameters) and
whether the first forward with expert-parallel size 1 equals the local path exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepseek_moe.model import DeepseekForCausalLM  # noqa: E402
from deepseek_moe.parallel.data_parallel import apply_fsdp, clip_grad_norm_, sync_gradients  # noqa: E402
from deepseek_moe.parallel.expert_parallel import apply_expert_parallel  # noqa: E402
from deepseek_moe.parallel.mesh import ParallelPlan, build_mesh, init_distributed  # noqa: E402
from deepseek_moe.presets import get_config  # noqa: E402
from deepseek_moe.train import param_groups  # noqa: E402

CFG = dict(vocab_size=256, num_hidden_layers=2, hidden_size=32, num_attention_heads=4, moe_intermediate_size=16,
           n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, aux_loss_alpha=0.01,
           device_aux_loss_alpha=0.05)
B, S, STEPS = 8, 16, 5


CAPACITY = None


def build(n_groups: int) -> DeepseekForCausalLM:
    torch.manual_seed(0)
    m = DeepseekForCausalLM(get_config("deepseekmoe-tiny", n_device_groups=n_groups,
                                       capacity_factor=CAPACITY, **CFG))
    m.init_weights(0.05)  # far from uniform routing, so the balance losses are not flat
    return m


def optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), foreach=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep", type=int, required=True)
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--capacity", type=float, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    global CAPACITY
    CAPACITY = args.capacity
    rank, world = init_distributed(torch.device("cpu"))
    plan = ParallelPlan(world=world, ep=args.ep, fsdp=args.fsdp)
    plan.validate(get_config("deepseekmoe-tiny", **CFG))
    mesh, world_mesh = build_mesh(plan, torch.device("cpu"))
    data = torch.randint(0, CFG["vocab_size"], (B, S), generator=torch.Generator().manual_seed(1))
    b = B // world
    x = data[rank * b:(rank + 1) * b]

    model = build(max(args.ep, 1))
    plain_local = build(max(args.ep, 1))
    apply_expert_parallel(model, mesh)
    if args.fsdp:
        apply_fsdp(model, world_mesh)
    opt = optimizer(model)  # FSDP2: before any forward, so that it holds the sharded parameters
    with torch.no_grad():
        ep1_exact = bool(torch.equal(model(x).logits, plain_local(x).logits)) if args.ep == 1 else None
    losses, dev, dropped = [], [], 0
    for _ in range(STEPS):
        out = model(x, labels=x)
        dropped += int(out.dropped_tokens.sum())
        out.loss.backward()
        sync_gradients(model, mesh, args.fsdp)
        clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats = torch.stack([out.loss.detach(), out.device_balance_loss.detach().sum()])
        dist.all_reduce(stats)
        losses.append(stats[0].item() / world)
        dev.append(stats[1].item() / world)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        ref = build(max(args.ep, 1))
        ropt = optimizer(ref)
        rlosses, rdev = [], []
        parts = [data] if CAPACITY is None else list(data.chunk(world))
        for _ in range(STEPS):
            loss = devl = 0.0
            for part in parts:
                out = ref(part, labels=part)
                (out.loss / len(parts)).backward()
                loss += out.loss.item() / len(parts)
                devl += out.device_balance_loss.sum().item() / len(parts)
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            ropt.step()
            ropt.zero_grad(set_to_none=True)
            rlosses.append(loss)
            rdev.append(devl)
        rsd = ref.state_dict()
        param_diff = max((full[k].float() - v.float()).abs().max().item() for k, v in rsd.items())
        Path(args.out).write_text(json.dumps({
            "world": world, "ep": args.ep, "fsdp": args.fsdp, "losses": losses, "ref_losses": rlosses,
            "loss_diff": max(abs(a - b) for a, b in zip(losses, rlosses)),
            "device_loss_diff": max(abs(a - b) for a, b in zip(dev, rdev)), "device_losses": dev,
            "param_diff": param_diff, "keys_match": sorted(full) == sorted(rsd), "ep1_exact": ep1_exact,
            "dropped": dropped,
        }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
