"""Training tokens/s of the tiny DeepSeekMoE vs a tiny Dense model with the same activated
parameters, measured in one run (the two models' steps interleaved one by one, medians).

The Dense model is ``dense-tiny`` with its FFN widened to the MoE layer's activated width
((shared + top-k) x expert width = 8 x 88 = 704), so both do the same matmul FLOPs per token and
the ratio measures what routing, dispatch and the balance losses cost.

Both arithmetic modes of ``train`` are measured: plain fp32 and bf16 autocast (the latter where
this CPU multiplies bf16 at least as fast as fp32), with freed memory kept as every command does.

    .venv/bin/python benchmarks/train_throughput.py [--steps 5] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from deepseek_moe.model import DeepseekForCausalLM
from deepseek_moe.params import count_parameters
from deepseek_moe.presets import get_config
from deepseek_moe.runtime import autocast, configure_process, cpu_matmul_speeds
from deepseek_moe.train import TrainConfig, build_optimizer

GOAL = 0.90


def make(name: str, **overrides):
    cfg = get_config(name, **overrides)
    torch.manual_seed(0)
    model = DeepseekForCausalLM(cfg)
    opt = build_optimizer(model, TrainConfig(steps=1))
    return cfg, model, opt


def time_step(model, opt, x: torch.Tensor, dtype) -> float:
    """Seconds of one optimizer step (forward, backward, clip, AdamW) on batch ``x``."""
    t0 = time.perf_counter()
    with autocast(dtype, torch.device("cpu")):
        out = model(x, labels=x)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="deepseekmoe-tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps of each model per round (batches)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the batches (median of all steps)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    configure_process()

    moe_cfg, moe, moe_opt = make(args.preset)
    width = (moe_cfg.n_shared_experts + moe_cfg.num_experts_per_tok) * moe_cfg.moe_intermediate_size
    dense_cfg, dense, dense_opt = make("dense-tiny", intermediate_size=width,
                                       vocab_size=moe_cfg.vocab_size)
    r_moe, r_dense = count_parameters(moe_cfg), count_parameters(dense_cfg)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, moe_cfg.vocab_size, (args.batch_size, args.seq_len), generator=g)
               for _ in range(args.steps)]
    tokens = args.batch_size * args.seq_len
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    speeds = cpu_matmul_speeds()
    if "bfloat16" in dtypes and speeds["bfloat16"] < speeds["float32"] and dtypes != ["bfloat16"]:
        dtypes.remove("bfloat16")
    results = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size} x {args.seq_len} = {tokens} tokens/step, "
          f"{args.rounds} rounds x {args.steps} steps; matmul fp32 {speeds['float32']:.0f}, "
          f"bf16 {speeds['bfloat16']:.0f} GFLOP/s")
    print(f"{'model':<34}{'dtype':>10}{'activated':>11}{'total':>10}{'s/step':>9}{'tokens/s':>10}")
    for name in dtypes:
        dt = None if name == "float32" else getattr(torch, name)
        for x in batches[:2]:  # warm-up
            for model, opt in ((moe, moe_opt), (dense, dense_opt)):
                time_step(model, opt, x, dt)
        # The two models' steps alternate one by one (which goes first alternating too), so that
        # a slow spell of a shared machine (seconds long) hits both alike; medians of all steps.
        t_moe, t_dense = [], []
        for r in range(args.rounds):
            for i, x in enumerate(batches):
                pair = ((moe, moe_opt, t_moe), (dense, dense_opt, t_dense))
                for model, opt, ts in (pair if (r + i) % 2 == 0 else pair[::-1]):
                    ts.append(time_step(model, opt, x, dt))
        m, d = statistics.median(t_moe), statistics.median(t_dense)
        print(f"{moe_cfg.name:<34}{name:>10}{r_moe.active / 1e6:>10.2f}M{r_moe.total / 1e6:>9.2f}M"
              f"{m:>9.3f}{tokens / m:>10,.0f}")
        print(f"{'dense-tiny (FFN ' + str(width) + ')':<34}{name:>10}{r_dense.active / 1e6:>10.2f}M"
              f"{r_dense.total / 1e6:>9.2f}M{d:>9.3f}{tokens / d:>10,.0f}")
        results[name] = {"moe_s_per_step": t_moe, "dense_s_per_step": t_dense, "ratio": d / m,
                         "moe_tokens_per_s": tokens / m}
    for name, r in results.items():
        print(f"ratio MoE/Dense tokens/s, {name}: {r['ratio']:.3f}   "
              f"(goal >= {GOAL:.2f}: {'met' if r['ratio'] >= GOAL else 'NOT met'})")
    if len(results) == 2:
        a, b = results["float32"]["moe_tokens_per_s"], results["bfloat16"]["moe_tokens_per_s"]
        print(f"MoE tokens/s bf16 autocast / fp32: {b / a:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
