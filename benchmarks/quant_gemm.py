"""The products of one quantized layer of the 16B's shapes, every way this package can take them,
at several row counts, in one run: the integer GEMM (``kernels.quant_gemm_int8`` /
``quant_gemm_int4``, AVX512-VNNI), the few-row kernel (``kernels.quant_gemv``), torch's
weight-only int8 kernel, dequantizing to bf16 for a bf16 GEMM, and the bf16 GEMM on a weight
dequantized beforehand (no dequantization counted), with the integer GEMM's speed-up over each and
its GOP/s. Weights in cache (one weight, repeated): the arithmetic, not the memory.

    .venv/bin/python benchmarks/quant_gemm.py
    .venv/bin/python benchmarks/quant_gemm.py --bits 4 --rows 4 48 512 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(1408, 2048), (2048, 1408), (2048, 2048)]  # expert gate/up, expert down, attention


def best_time(fn, seconds: float = 0.3, rounds: int = 3) -> float:
    """The least of ``rounds`` mean times over ``seconds`` each, after one warm-up call."""
    fn()
    means = []
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += 1
        means.append((time.perf_counter() - t0) / n)
    return min(means)


def main() -> None:
    from deepseek_moe import kernels
    from deepseek_moe.quant import GEMM_GROUP, quantize_weight

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=[8, 4])
    p.add_argument("--rows", type=int, nargs="+", default=[2, 4, 8, 48, 512])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.gemm_available():
        raise SystemExit(f"no integer GEMM here (it needs AVX512-VNNI; the kernels: {kernels.load() or 'loaded'})")
    print(f"{args.threads} threads; activations bf16, in groups of {GEMM_GROUP} for the integer GEMM")
    print(f"{'bits':>4} {'N x K':>11} {'rows':>5} {'int GEMM ms':>12} {'GOP/s':>6} {'vs few-row':>11} "
          f"{'vs torch int8':>14} {'vs deq+bf16':>12} {'vs bf16 only':>13}")
    speedups: dict[str, list[float]] = {"few-row": [], "torch int8": [], "deq+bf16": [], "bf16 only": []}
    g = torch.Generator().manual_seed(0)
    for bits in args.bits:
        for N, K in SHAPES:
            t = quantize_weight(torch.randn(N, K, generator=g) * 0.02, bits, 128)
            if bits == 8:
                W, S = t["weight"], t["weight_scale"]
                ours = lambda x: kernels.quant_gemm_int8(x, W, S, GEMM_GROUP)  # noqa: E731
                few = lambda x: kernels.quant_gemv(x, [W], [S], [], [0], [x.shape[0]], 8, 0)  # noqa: E731
                deq = lambda: kernels.dequant_int8(W, S)  # noqa: E731
                torch_int8 = lambda x: torch.ops.aten._weight_int8pack_mm(x, W, S)  # noqa: E731
            else:
                P, S, Z = t["weight_packed"], t["weight_scale"], t["weight_zero"]
                ours = lambda x: kernels.quant_gemm_int4(x, P, S, Z, 128, GEMM_GROUP)  # noqa: E731
                few = lambda x: kernels.quant_gemv(x, [P], [S], [Z], [0], [x.shape[0]], 4, 128)  # noqa: E731
                deq = lambda: kernels.dequant_int4(P, S, Z, 128)  # noqa: E731
                torch_int8 = None
            dense = deq()
            for M in args.rows:
                x = torch.randn(M, K, generator=g).bfloat16()
                t_ours = best_time(lambda: ours(x))
                others = {"few-row": best_time(lambda: few(x)) if M <= 48 else None,
                          "torch int8": best_time(lambda: torch_int8(x)) if torch_int8 else None,
                          "deq+bf16": best_time(lambda: F.linear(x, deq())),
                          "bf16 only": best_time(lambda: F.linear(x, dense))}
                cells = []
                for name, t_other in others.items():
                    if t_other is None:
                        cells.append("-")
                    else:
                        speedups[name].append(t_other / t_ours)
                        cells.append(f"{t_other / t_ours:.2f}x")
                print(f"{bits:>4} {N:>5} x {K:<5} {M:>5} {t_ours * 1e3:>12.3f} {2 * M * N * K / t_ours / 1e9:>6.0f} "
                      f"{cells[0]:>11} {cells[1]:>14} {cells[2]:>12} {cells[3]:>13}")
    print("median speed-up of the integer GEMM: " + ", ".join(
        f"{name} {statistics.median(v):.2f}x" for name, v in speedups.items() if v))


if __name__ == "__main__":
    main()
