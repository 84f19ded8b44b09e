"""The released deepseek-moe-16b on this machine: bf16 as published, int8 and int4, one table.

For each checkpoint (``--bf16 DIR``, ``--int8 DIR``, ``--int4 DIR``; ``--convert DIR`` first
makes the int8 and int4 ones from the bf16 one with ``deepseek-moe quantize``, timing it), in a
fresh process each: the size on disk, the load time, a 512-token prefill and 64 greedy decoded
tokens (tokens/s, after one untimed prefill of another prompt has paged the weights in), and the
process's peak resident memory. Decode is also given as a fraction of
this machine's memory-bandwidth bound: the bytes of weights one token reads (every dense and
shared weight, k of the routed experts of each MoE layer, the output head, one embedding row)
divided by the bandwidth of reading a 2 GiB buffer. Use the full-size random checkpoint that
``scripts/random_checkpoint.py`` writes when the real weights are not at hand.

    python benchmarks/big_model.py --bf16 /work/big/deepseek-moe-16b-random --convert /work/big
    python benchmarks/big_model.py --int8 DIR --int4 DIR --json out.json

Peak resident memory counts the checkpoint pages a process touched: memory-mapped weights that
the kernel can drop again, besides what it allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GOAL_RSS_GIB = 20.0
GOAL_INT4_BOUND = 0.5


def worker(path: str, prompt_len: int, new: int, threads: int) -> dict:
    import torch

    from deepseek_moe.checkpoint import load_pretrained
    from deepseek_moe.generate import generate
    from deepseek_moe.quant import QuantLinear

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load_pretrained(path)
    load_s = time.perf_counter() - t0
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    warm, prompt = torch.randint(0, min(cfg.vocab_size, 100000), (2, 1, prompt_len), generator=g)
    with torch.inference_mode():
        model(warm)  # pages the weights in (those that fit): the timed runs see a warm cache
        t0 = time.perf_counter()
        model(prompt)
        prefill_s = time.perf_counter() - t0
        stamps: list[float] = []
        t0 = time.perf_counter()
        generate(model, [prompt[0, :16].tolist()], new, greedy=True,
                 stream=lambda row, tok: stamps.append(time.perf_counter() - t0))
    decode_s = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)

    def nbytes(m: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])

    per_token = 0
    for name, m in model.named_modules():
        b = nbytes(m)
        if ".experts." in name:  # a routed expert's module: k of E read per token
            b = b * cfg.num_experts_per_tok / cfg.n_routed_experts
        elif name == "model.embed_tokens":
            b = b / cfg.vocab_size  # one row
        per_token += b
    quant = next((f"int{m.bits}" for m in model.modules() if isinstance(m, QuantLinear)), "bf16")
    return {"mode": quant, "load_s": load_s, "prefill_tok_s": prompt_len / prefill_s,
            "decode_tok_s": 1 / decode_s, "bytes_per_token": per_token,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def bandwidth_gbs(threads: int) -> float:
    """Read bandwidth: summing a 2 GiB buffer, best of 3."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(2**29, dtype=torch.float32)
    best = min(_timed(lambda: x.sum()) for _ in range(3))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_child(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{args}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def convert(src: str, out: str, bits: int) -> dict:
    """``deepseek-moe quantize`` in a process of its own: seconds and peak memory."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", (
        "import resource, sys; from deepseek_moe.quantize import quantize_checkpoint; "
        f"quantize_checkpoint({src!r}, {out!r}, {bits}, force=True, progress=False); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"quantize int{bits}: {r.stderr.strip().splitlines()[-1]}")
    return {"convert_s": time.perf_counter() - t0, "convert_rss_gib": int(r.stdout.split()[-1]) / 2**20}


def disk_gb(path: str) -> float:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bf16", help="a bf16 checkpoint, as published")
    p.add_argument("--int8")
    p.add_argument("--int4")
    p.add_argument("--convert", metavar="DIR", help="write the int8 / int4 checkpoints of --bf16 into DIR first")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--bandwidth", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.prompt_len, args.new, args.threads)))
        return
    if args.bandwidth:
        print(json.dumps({"gbs": bandwidth_gbs(args.threads)}))
        return
    modes = {"bf16": args.bf16, "int8": args.int8, "int4": args.int4}
    conversions: dict[str, dict] = {}
    if args.convert:
        if not args.bf16:
            p.error("--convert needs --bf16")
        name = Path(args.bf16).name
        for bits in (8, 4):
            out = str(Path(args.convert) / f"{name}-int{bits}")
            conversions[f"int{bits}"] = convert(args.bf16, out, bits)
            modes[f"int{bits}"] = out
    modes = {k: v for k, v in modes.items() if v}
    if not modes:
        p.error("give at least one checkpoint")
    bw = run_child(["--bandwidth", "--threads", str(args.threads)])["gbs"]
    rows = []
    for mode, path in modes.items():
        r = run_child(["--worker", path, "--prompt-len", str(args.prompt_len), "--new", str(args.new),
                       "--threads", str(args.threads)])
        r.update(conversions.get(mode, {}), mode=mode, disk_gb=disk_gb(path),
                 bound_fraction=r["decode_tok_s"] * r["bytes_per_token"] / (bw * 1e9))
        rows.append(r)
    print(f"{args.threads} threads; read bandwidth {bw:.1f} GB/s; prompt {args.prompt_len}, {args.new} decoded")
    head = ("mode", "disk GB", "convert s", "convert RSS GiB", "load s", "peak RSS GiB", "prefill tok/s",
            "decode tok/s", "GB/token", "of bound")
    print("  ".join(f"{h:>14}" for h in head))
    for r in rows:
        cells = (r["mode"], f"{r['disk_gb']:.2f}", f"{r['convert_s']:.0f}" if "convert_s" in r else "-",
                 f"{r['convert_rss_gib']:.1f}" if "convert_rss_gib" in r else "-", f"{r['load_s']:.1f}",
                 f"{r['peak_rss_gib']:.1f}", f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.2f}",
                 f"{r['bytes_per_token'] / 1e9:.2f}", f"{r['bound_fraction']:.2f}")
        print("  ".join(f"{c:>14}" for c in cells))
    for r in rows:
        ok = r["peak_rss_gib"] <= GOAL_RSS_GIB
        print(f"{r['mode']}: peak RSS {r['peak_rss_gib']:.1f} GiB (goal <= {GOAL_RSS_GIB:.0f}: {'met' if ok else 'NOT met'})"
              + (f"; decode {r['bound_fraction']:.2f} of the bound (goal >= {GOAL_INT4_BOUND}: "
                 f"{'met' if r['bound_fraction'] >= GOAL_INT4_BOUND else 'NOT met'})" if r["mode"] == "int4" else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_gbs": bw, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
