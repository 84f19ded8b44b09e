"""DeepSeekMoE layer vs a dense SwiGLU FFN of the same activated FLOPs, measured in one run.

For each shape it times, on the CPU with torch's default thread count (or a GPU: ``--device cuda``,
every time taken after a ``cuda.synchronize``):

- ``fast``: the ``DeepseekMoE`` layer with ``dispatch="fast"`` (router, sorted dispatch, grouped
  experts, shared experts, balance losses: everything the layer does in training);
- ``reference``: the same layer and weights with ``dispatch="reference"`` (the per-expert loop);
- ``dense``: ``deepseek_moe.ffn.SwiGLU`` of intermediate ``(n_shared + top_k) * moe_intermediate``,
  i.e. the FLOPs one token activates in the MoE layer (without the small router GEMM).

"forward" is the training forward (autograd on, activations saved, graph then dropped);
"fwd+bwd" adds ``y.backward(g)`` with a fixed random upstream gradient ``g`` (a ``y.sum()``
would hand every kernel a stride-0 gradient, which real training never does). Parameter
gradients are reset to ``None`` before every step, as ``optimizer.zero_grad()`` does. Each time is
the median over ``--repeats`` after the warm-up (``warm_up``: until the heap has stopped growing,
as it has after training's first few steps); dense and MoE runs alternate inside each repeat so
that machine noise hits both alike, and the table shows each path's page faults per timed step.
The ratio is dense time / MoE time (1.0 = the MoE layer costs no more than the dense FFN it
replaces FLOP for FLOP).

Memory allocation matters on CPU: glibc returns every freed block above 32 MB to the OS, so
each step's big tensors (the MoE layer's weight gradients above all: 8x the dense FFN's
parameters) would be fresh pages again every step, and first-touch page faults are slow. Every
``deepseek-moe`` command keeps freed memory in the process (``deepseek_moe.runtime.keep_freed_memory``);
this script does the same, as the product does, unless ``--system-malloc`` (glibc's defaults, for
comparison).

Both dtypes are measured by default: fp32, and bf16 where this CPU multiplies bf16 at least as
fast as fp32 (``--dtypes`` picks). In bf16 both modules are cast to bf16.

    python benchmarks/moe_layer.py                       # both shapes, both dtypes, reference on 2b
    python benchmarks/moe_layer.py --shapes 2b --skip-reference --repeats 3 --json out.json
    python benchmarks/moe_layer.py --skip-reference --system-malloc --dtypes float32
    python benchmarks/moe_layer.py --skip-reference --compare-backend loop   # the CPU's backends side by side
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

try:
    import resource  # Unix only
except ImportError:  # pragma: no cover - Windows
    resource = None

from deepseek_moe.config import DeepseekMoEConfig
from deepseek_moe.ffn import SwiGLU
from deepseek_moe.moe import DeepseekMoE
from deepseek_moe.runtime import ONEDNN_CACHE_CAPACITY, ONEDNN_CACHE_ENV, cpu_matmul_speeds, keep_freed_memory

GOAL = 0.90  # dense / MoE forward+backward time


@dataclass
class Shape:
    name: str
    hidden: int
    n_shared: int
    n_routed: int
    moe_intermediate: int
    top_k: int
    tokens: int
    seq_len: int = 1024

    @property
    def dense_intermediate(self) -> int:
        return (self.n_shared + self.top_k) * self.moe_intermediate


SHAPES = {
    # DeepSeekMoE 2B (paper Table 1 / Appendix A): 1 shared + 63 routed of 0.25x FFN width, top-7.
    "2b": Shape("2b", hidden=1280, n_shared=1, n_routed=63, moe_intermediate=856, top_k=7, tokens=4096),
    # DeepSeekMoE 16B (released config.json): 2 shared + 64 routed of 1408, top-6.
    "16b": Shape("16b", hidden=2048, n_shared=2, n_routed=64, moe_intermediate=1408, top_k=6, tokens=2048),
    # The tiny presets' layer (deepseekmoe-tiny: 1 shared + 63 routed of 88, top-7) at the batch
    # `train` uses (16 x 256): the shape behind benchmarks/train_throughput.py.
    "tiny": Shape("tiny", hidden=128, n_shared=1, n_routed=63, moe_intermediate=88, top_k=7,
                  tokens=4096, seq_len=256),
    # A smoke test of this script, seconds to run; not a shape worth quoting.
    "smoke": Shape("smoke", hidden=256, n_shared=1, n_routed=15, moe_intermediate=128, top_k=3, tokens=512,
                   seq_len=256),
}


def build_moe(s: Shape, dtype: torch.dtype, seed: int = 0) -> DeepseekMoE:
    cfg = DeepseekMoEConfig(
        vocab_size=1024,
        hidden_size=s.hidden,
        intermediate_size=s.dense_intermediate,
        moe_intermediate_size=s.moe_intermediate,
        num_hidden_layers=1,
        num_attention_heads=s.hidden // 128,
        n_shared_experts=s.n_shared,
        n_routed_experts=s.n_routed,
        num_experts_per_tok=s.top_k,
        first_k_dense_replace=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    layer = DeepseekMoE(cfg)
    init_normal_(layer, std=cfg.initializer_range, seed=seed)
    return layer.to(dtype)


def init_normal_(module: torch.nn.Module, std: float, seed: int) -> None:
    # Router included: with N(0, 0.006) centroids and N(0, 1) inputs the logits have a std of
    # about 0.2, so the load is close to balanced but uneven, as early in training.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def timed(fn: Callable[[], None]) -> float:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # GPU kernels run asynchronously: time them to completion
    return time.perf_counter() - t0


def page_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not count them)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


# A warm-up round that faults in more than this many fresh pages (16 MiB) has not yet reached
# the steady state of training, where the heap already holds every block a step needs.
SETTLED_FAULTS = 4096


def warm_up(runs: dict[tuple[str, str], Callable[[], None]], args: argparse.Namespace) -> int:
    """Untimed rounds of every run in the timed order (allocator, MKL/oneDNN kernels): at least
    ``--warmup``, then more (up to ``--max-warmup``) while a round still page-faults in fresh
    memory. With freed memory kept, the heap grows over the first few steps until it holds a hole
    for each of a step's big blocks (the 16B shape's expert gradients are three 738 MB tensors
    in fp32); a step that grows it pays a fault per fresh page, about a second at that shape, so
    timing before the heap has settled measures the first steps of training, not the rest.
    Returns the rounds run."""
    # Under glibc's defaults (--system-malloc) the faults recur every step: nothing to wait for.
    limit = args.warmup if args.system_malloc else max(args.warmup, args.max_warmup)
    rounds = 0
    while 0 < args.warmup and rounds < limit:
        f0 = page_faults()
        for fn in runs.values():
            fn()
        rounds += 1
        if rounds >= args.warmup and page_faults() - f0 <= SETTLED_FAULTS * len(runs):
            break
    return rounds


def saved_activation_bytes(step: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves for backward, parameters excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = step()
    del y
    return sum(seen.values())


def bench_shape(s: Shape, args: argparse.Namespace, dtype: torch.dtype) -> dict:
    torch.manual_seed(1)
    dev = torch.device(args.device)
    moe = build_moe(s, dtype).to(dev)
    moe.experts.backend = args.backend
    dense = SwiGLU(s.hidden, s.dense_intermediate)
    init_normal_(dense, std=0.006, seed=2)
    dense = dense.to(dev, dtype)
    B = max(1, s.tokens // s.seq_len)
    x = torch.randn(B, s.tokens // B, s.hidden, dtype=dtype).to(dev).requires_grad_(True)
    gy = torch.randn_like(x)  # upstream gradient, fixed and outside the timing

    def moe_out() -> torch.Tensor:
        return moe(x)[0]

    def with_backend(backend: str, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            moe.experts.backend = backend
            try:
                fn()
            finally:
                moe.experts.backend = args.backend
        return run

    def step(module: torch.nn.Module, fwd: Callable[[], torch.Tensor], backward: bool) -> None:
        for p in module.parameters():
            p.grad = None
        x.grad = None
        y = fwd()
        if backward:
            y.backward(gy)

    runs = {
        ("dense", "forward"): lambda: step(dense, lambda: dense(x), False),
        ("fast", "forward"): lambda: step(moe, moe_out, False),
        ("dense", "fwd+bwd"): lambda: step(dense, lambda: dense(x), True),
        ("fast", "fwd+bwd"): lambda: step(moe, moe_out, True),
    }
    if args.compare_backend:  # the same layer on another backend, in the same alternation
        for kind, bwd in (("forward", False), ("fwd+bwd", True)):
            runs[(args.compare_backend, kind)] = with_backend(
                args.compare_backend, lambda b=bwd: step(moe, moe_out, b))
    moe.dispatch = "fast"
    res: dict = {"shape": vars(s) | {"dense_intermediate": s.dense_intermediate}, "times_s": {}}
    res["warmup_rounds"] = warm_up(runs, args)
    samples: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
    faults: dict[tuple[str, str], list[int]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for key, fn in runs.items():
            f0 = page_faults()
            samples[key].append(timed(fn))
            faults[key].append(page_faults() - f0)
    for (name, kind), ts in samples.items():
        res["times_s"][f"{name}/{kind}"] = {"median": statistics.median(ts), "all": ts,
                                            "page_faults": faults[(name, kind)]}

    # Routing load: how uneven is it (max / mean assignments per expert)?
    with torch.no_grad():
        _, aux = moe(x)
    load = aux.tokens_per_expert.float()
    res["load_max_over_mean"] = (load.max() / load.mean()).item()
    res["load_min_over_mean"] = (load.min() / load.mean()).item()
    res["backend"] = moe.experts.resolve_backend(x)

    if not args.skip_reference:
        moe.dispatch = "reference"
        with torch.no_grad():
            y_ref = moe(x)[0]
            moe.dispatch = "fast"
            y_fast = moe(x)[0]
        res["max_abs_diff_fast_vs_reference"] = (y_fast.float() - y_ref.float()).abs().max().item()
        moe.dispatch = "reference"
        for kind, bwd in (("forward", False), ("fwd+bwd", True)):
            ts = [timed(lambda b=bwd: step(moe, moe_out, b)) for _ in range(args.reference_repeats)]
            res["times_s"][f"reference/{kind}"] = {"median": statistics.median(ts), "all": ts}
        moe.dispatch = "fast"

    if args.memory:
        moe.dispatch = "fast"
        res["saved_activation_MiB"] = {
            "fast": saved_activation_bytes(moe_out, list(moe.parameters())) / 2**20,
            "dense": saved_activation_bytes(lambda: dense(x), list(dense.parameters())) / 2**20,
        }
    t = res["times_s"]
    res["ratio_dense_over_moe"] = {
        kind: t[f"dense/{kind}"]["median"] / t[f"fast/{kind}"]["median"] for kind in ("forward", "fwd+bwd")
    }
    res["goal_met"] = res["ratio_dense_over_moe"]["fwd+bwd"] >= GOAL
    return res


def allocator_settings(args: argparse.Namespace) -> str:
    keys = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD",
            "THP_MEM_ALLOC_ENABLE")
    set_ = [f"{k}={os.environ[k]}" for k in keys if k in os.environ]
    set_.insert(0, "glibc defaults (--system-malloc)" if args.system_malloc else
                f"freed memory kept (as every command does){'' if args.malloc_kept else ': not glibc, no-op'}")
    return ", ".join(set_)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU, {torch.get_num_threads()} threads"


def print_table(results: list[dict], args: argparse.Namespace, dtype: str) -> None:
    print(f"\ntorch {torch.__version__}, {device_name(args.device)}, dtype {dtype}, "
          f"median of {args.repeats} (reference: {args.reference_repeats}) after "
          f"{'/'.join(str(r['warmup_rounds']) for r in results)} warm-up round(s) "
          f"({', '.join(r['shape']['name'] for r in results)}); {allocator_settings(args)}")
    # Other processes on these cores slow the MoE layer's many per-expert ops down more than
    # the dense FFN's few big ones: a load above the thread count makes the ratios pessimistic.
    print(f"1-minute load average {args.load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    hdr = (f"{'shape':<6}{'path':<11}{'forward ms':>12}{'fwd+bwd ms':>12}{'dense/x fwd':>13}{'dense/x f+b':>13}"
           f"{'faults/step':>13}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        t = r["times_s"]
        name = r["shape"]["name"]
        dense_f, dense_fb = t["dense/forward"]["median"], t["dense/fwd+bwd"]["median"]
        for path in ("dense", "fast", args.compare_backend, "reference"):
            if not path or f"{path}/forward" not in t:
                continue
            f, fb = t[f"{path}/forward"]["median"], t[f"{path}/fwd+bwd"]["median"]
            flt = t[f"{path}/fwd+bwd"].get("page_faults") or [0]
            print(f"{name:<6}{path:<11}{f * 1e3:>12.1f}{fb * 1e3:>12.1f}{dense_f / f:>13.3f}{dense_fb / fb:>13.3f}"
                  f"{statistics.mean(flt):>13,.0f}")
        if args.compare_backend and f"{args.compare_backend}/fwd+bwd" in t:
            alt = t[f"{args.compare_backend}/fwd+bwd"]["median"]
            print(f"{name:<6}fast ({r['backend']}) is {alt / t['fast/fwd+bwd']['median']:.2f}x as fast as "
                  f"{args.compare_backend}, forward+backward")
    print()
    for r in results:
        s = r["shape"]
        extra = []
        if "saved_activation_MiB" in r:
            m = r["saved_activation_MiB"]
            extra.append(f"saved activations fast {m['fast']:.0f} MiB vs dense {m['dense']:.0f} MiB")
        if "max_abs_diff_fast_vs_reference" in r:
            extra.append(f"max |fast - reference| {r['max_abs_diff_fast_vs_reference']:.1e}")
        print(f"{s['name']}: hidden {s['hidden']}, {s['n_shared']} shared + {s['n_routed']} routed x "
              f"{s['moe_intermediate']}, top-{s['top_k']}, {s['tokens']} tokens; dense intermediate "
              f"{s['dense_intermediate']}; expert load max/mean {r['load_max_over_mean']:.2f}, "
              f"min/mean {r['load_min_over_mean']:.2f}; experts backend {r['backend']}" + ("; " + "; ".join(extra) if extra else ""))
    for r in results:
        t = r["times_s"]
        if "reference/fwd+bwd" in t:
            print(f"{r['shape']['name']}: fast path vs reference loop: forward "
                  f"{t['reference/forward']['median'] / t['fast/forward']['median']:.1f}x, fwd+bwd "
                  f"{t['reference/fwd+bwd']['median'] / t['fast/fwd+bwd']['median']:.1f}x faster")
    print(f"\ngoal: dense/MoE forward+backward >= {GOAL:.2f} ({dtype})")
    for r in results:
        ratio = r["ratio_dense_over_moe"]["fwd+bwd"]
        print(f"  {r['shape']['name']}: {ratio:.3f} -> {'met' if r['goal_met'] else 'NOT met'}")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="2b,16b", help="comma-separated, from: " + ", ".join(SHAPES))
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of the fast and dense paths")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every run before timing")
    p.add_argument("--max-warmup", type=int, default=6,
                   help="more untimed rounds, up to this many in all, while a round still page-faults "
                   "in fresh memory (the heap not yet at its steady-state size)")
    p.add_argument("--reference-repeats", type=int, default=1,
                   help="timed repeats of the slow reference loop (no warm-up)")
    p.add_argument("--skip-reference", action="store_true", help="do not time the reference loop")
    p.add_argument("--reference-shapes", default="2b",
                   help="shapes on which to time the reference loop (unless --skip-reference)")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="comma-separated from float32, bfloat16, float16 (on the CPU bf16 is skipped "
                   "where it is slower than fp32)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip measuring the autograd-saved activation memory")
    p.add_argument("--system-malloc", action="store_true",
                   help="glibc's default malloc settings instead of the product's (freed memory kept)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (GPU times are synchronised)")
    p.add_argument("--backend", default="auto",
                   help="the experts stage's backend for the fast path (auto, loop, padded, threaded, grouped_mm)")
    p.add_argument("--compare-backend", default=None, metavar="BACKEND",
                   help="also time the layer on this backend, alternating with the others (a row of its own)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per step instead of the shape's")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.malloc_kept = False if args.system_malloc else keep_freed_memory()
    os.environ.setdefault(ONEDNN_CACHE_ENV, str(ONEDNN_CACHE_CAPACITY))  # as every command does
    names = [n.strip().lower() for n in args.shapes.split(",") if n.strip()]
    ref_names = {n.strip().lower() for n in args.reference_shapes.split(",")}
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("float32", "bfloat16", "float16")]
    if bad:
        p.error(f"unknown dtype(s) {bad}")
    if args.device == "cpu" and "bfloat16" in dtypes:
        speeds = cpu_matmul_speeds()
        print(f"this CPU: matmul fp32 {speeds['float32']:.0f} GFLOP/s, bf16 {speeds['bfloat16']:.0f} GFLOP/s")
        if speeds["bfloat16"] < speeds["float32"] and dtypes != ["bfloat16"]:
            print("bf16 is slower than fp32 here: measuring fp32 only (--dtypes bfloat16 forces it)")
            dtypes = [d for d in dtypes if d != "bfloat16"]
    args.load_before = os.getloadavg()[0]
    tables = {}
    skip_ref = args.skip_reference
    for dtype in dtypes:
        results = []
        for n in names:
            args.skip_reference = skip_ref or n not in ref_names
            t0 = time.perf_counter()
            shape = SHAPES[n] if args.tokens is None else dataclasses.replace(SHAPES[n], tokens=args.tokens)
            results.append(bench_shape(shape, args, getattr(torch, dtype)))
            print(f"[{n} {dtype} measured in {time.perf_counter() - t0:.0f} s]", flush=True)
        tables[dtype] = results
    args.skip_reference = skip_ref
    for dtype, results in tables.items():
        print_table(results, args, dtype)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": device_name(args.device),
                       "threads": torch.get_num_threads(), "repeats": args.repeats, "goal": GOAL,
                       "allocator": allocator_settings(args), "results": tables}, f, indent=2)


if __name__ == "__main__":
    main()
