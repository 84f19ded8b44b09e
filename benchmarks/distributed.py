"""Expert parallelism: all-to-all volume of the paper's models (computed) and step times (measured).

    .venv/bin/python benchmarks/distributed.py            # both tables
    .venv/bin/python benchmarks/distributed.py --volume   # the computed table only

Volume: each token-expert assignment whose expert lives on another rank crosses the network
four times per step (dispatch and combine in forward, their gradients in backward), as D
activations in bf16. Under balanced routing a fraction (EP - 1) / EP of the assignments leaves
its rank. Per step = the paper's batch (4K x 4.5K tokens); per rank = that over EP ranks.

Step times: the tiny DeepSeekMoE (64 routed experts so that 2 and 4 divide them) trained with a
fixed global batch under torchrun with gloo, one process per layout, on this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENS_PER_STEP = 4096 * 4500  # the paper's 16B and 145B batch (sections 5 and 7): 4.5K sequences of 4K
LAYOUTS = [(1, 1, False), (2, 2, False), (2, 2, True), (4, 4, False), (4, 2, True)]


def volume_table() -> str:
    from deepseek_moe.presets import get_config

    rows = ["| model | EP | bytes per token | per step (all ranks) | per rank per step, if world = EP |",
            "|---|---|---|---|---|"]
    for name in ("deepseekmoe-16b", "deepseekmoe-145b"):
        c = get_config(name)
        layers = len(c.moe_layers)
        for ep in (8, 64):
            per_token = 4 * c.num_experts_per_tok * c.hidden_size * 2 * layers * (ep - 1) / ep
            step = per_token * TOKENS_PER_STEP
            rows.append(f"| {name} (K={c.num_experts_per_tok}, D={c.hidden_size}, {layers} MoE layers) | {ep} "
                        f"| {per_token / 1e6:.2f} MB | {step / 1e12:.1f} TB | {step / ep / 1e9:.0f} GB |")
    return "\n".join(rows)


def worker(args: argparse.Namespace) -> None:
    import torch

    from deepseek_moe.model import DeepseekForCausalLM
    from deepseek_moe.parallel.data_parallel import apply_fsdp, clip_grad_norm_, sync_gradients
    from deepseek_moe.parallel.expert_parallel import apply_expert_parallel
    from deepseek_moe.parallel.mesh import Layout, ParallelPlan
    from deepseek_moe.presets import get_config
    from deepseek_moe.train import param_groups

    cfg = get_config("deepseekmoe-tiny", n_routed_experts=64, num_experts_per_tok=8)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = Layout(ParallelPlan(world=world, ep=args.ep, fsdp=args.fsdp), torch.device("cpu"))
    torch.manual_seed(0)
    model = DeepseekForCausalLM(cfg)
    if layout.active:
        apply_expert_parallel(model, layout.mesh)
        if args.fsdp:
            apply_fsdp(model, layout.world_mesh)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, foreach=False)
    params = [p for g in opt.param_groups for p in g["params"]]
    b = args.batch // world
    x = torch.randint(0, cfg.vocab_size, (b, args.seq_len), generator=torch.Generator().manual_seed(layout.rank))
    times = []
    for i in range(args.steps + 2):
        layout.barrier()
        t0 = time.perf_counter()
        out = model(x, labels=x)
        out.loss.backward()
        if layout.active:
            sync_gradients(model, layout.mesh, args.fsdp)
            clip_grad_norm_(params, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        layout.barrier()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if layout.is_main:
        print("RESULT " + json.dumps({"median_s": statistics.median(times), "threads": torch.get_num_threads()}))
    layout.close()


def measure(args: argparse.Namespace) -> str:
    rows = ["| processes | mesh dp x ep | FSDP2 | threads per rank | step time (s) | tokens/s | vs 1 process |",
            "|---|---|---|---|---|---|---|"]
    base = None
    for world, ep, fsdp in LAYOUTS:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_port", str(port), __file__, "--worker", "--ep", str(ep), "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--steps", str(args.steps)] + (["--fsdp"] if fsdp else [])
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:
            raise SystemExit(f"{cmd} failed:\n{r.stderr[-3000:]}")
        res = json.loads(line[0][7:])
        base = base or res["median_s"]
        tok = args.batch * args.seq_len / res["median_s"]
        rows.append(f"| {world} | {world // ep} x {ep} | {'yes' if fsdp else 'no'} | {res['threads']} "
                    f"| {res['median_s']:.3f} | {tok:,.0f} | {base / res['median_s']:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--volume", action="store_true", help="only the computed volume table")
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    print("all-to-all volume per optimizer step, bf16 activations, balanced routing (computed)\n")
    print(volume_table())
    if not args.volume:
        print(f"\nstep time, tiny DeepSeekMoE (64 routed, top-8), global batch {args.batch} x {args.seq_len}, "
              f"gloo on {os.cpu_count()} cores (measured, median of {args.steps})\n")
        print(measure(args))


if __name__ == "__main__":
    main()
