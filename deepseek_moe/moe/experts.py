"""Routed experts stored stacked, and the experts stage of the dispatch pipeline (``moe.dispatch``).

Shape legend: T tokens, E experts, D hidden size, I expert intermediate size, M token-expert
assignments (sorted by expert: ``counts_E[e]`` consecutive assignments per expert).

Weights are stacked parameters (``w1`` = gate_proj [E, I, D], ``w3`` = up_proj [E, I, D],
``w2`` = down_proj [E, D, I]); the checkpoint converter splits them into the released
per-expert tensors. The stage maps rows sorted by expert and their gates to
``gate * w2_e (silu(w1_e x) * w3_e x)``, the gate scaling the input of the down projection (the
same product as scaling the output, on I rather than D elements). Its backends:

- ``reference``: one expert at a time with plain autograd; readable.
- ``grouped_mm``: ``torch.nn.functional.grouped_mm`` with the group offsets on the device; no
  host synchronisation at all, and it compiles with ``fullgraph=True``: the GPU's choice.
- ``loop``: a hand-written autograd function that runs one GEMM per expert into slices of
  preallocated buffers and writes the weight gradients straight into the stacked gradient.
  Indexing ``w[e]`` inside autograd would make every backward allocate a full [E, ...] gradient
  per expert (8x slower training on CPU); this avoids it. It reads the per-expert counts once
  per call (one host synchronisation per layer, not per expert). On the CPU
  ``routed_forward`` runs it with the pipeline's gather, gate and combine fused in (as
  scattermoe does), behind the same inputs and result as the three stages.
- ``padded``: the same, but experts of similar row counts are grouped into buckets and each
  bucket runs as one batched GEMM over rows padded to a common count (``_PaddedGroupedSwiGLU``).
  The CPU's choice for small experts when the package's kernels cannot load; fused like ``loop``.
- ``threaded``: the package's compiled ``grouped_swiglu`` kernel (``_ThreadedGroupedSwiGLU``):
  whole experts shared out over the threads, each thread doing everything for its expert (gather,
  the three GEMMs on its own core, the gated SwiGLU in one vectorised pass, and the backward's
  mirror) in buffers that stay in its cache, and the combine summing each token's rows in row
  order. No per-GEMM thread start and join, no separate element-wise passes over [M, I] arrays:
  the CPU's choice whenever the kernels load (fp32 or bf16), fused like ``loop``. Results do not
  depend on the number of threads.

The stage computes in the autocast dtype when autocast is on (bf16 on a CPU that is faster in
it), else in the input's dtype; the pipeline's sum over a token's experts is fp32 either way.

Why the loop looks the way it does (CPU, fp32; benchmarks/moe_layer.py measures it against a
dense SwiGLU of the same activated FLOPs). One expert's GEMMs run about as fast as the dense
FFN's, so what separates the two is memory traffic and the number of parallel regions:

- Fresh memory is expensive: glibc hands freed blocks above 32 MB back to the OS, and touching
  them again costs 3-6x a pass over memory the process already has (page faults); every command
  therefore keeps freed memory (``deepseek_moe.runtime.keep_freed_memory``), and this path does
  not rely on it: the only full-size [M, ...] buffers are the three activations backward needs (g, u and the gated h);
  gathered rows, expert outputs and backward temporaries live in per-chunk work buffers below
  that limit, which the allocator recycles. The gathered input is not saved but gathered again
  in backward; outputs overwrite dead inputs; the gate multiplies the [M, I] input of the down
  projection rather than its wider [M, D] output; weight gradients are allocated empty, zeroing
  only experts that got no token. (2B layer, one forward+backward: 983 MiB of page faults,
  the dense FFN 956 MiB, the first version of this path 3553 MiB.)
- Every op is an OpenMP parallel region, and on a shared machine each region can wait a whole
  scheduler slice for a preempted thread. So only the GEMMs run per expert; gathers, SwiGLU
  elementwise work, gate and combine run once per chunk of experts (a handful per call). Doing
  them per expert matched this on an idle machine but was up to 2x slower on a busy one.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .. import kernels
from ..quant import FUSED_ROWS, GEMV_ROWS, QuantLinear, gemv, gemv_usable, kernel_args, storage_generation


# In bf16/fp16 the row counts of the per-expert GEMMs whose rows are independent are rounded up
# to a block of about 1/16 of the count (at least 8; at most 6% more rows). Their CPU GEMMs are
# oneDNN kernels compiled for each new shape (about 0.4 ms each, ten times a small GEMM), and
# expert loads change every step; rounded, a few dozen shapes per octave cover every load and stay
# cached. fp32 GEMMs (MKL) compile nothing, so fp32 keeps exact counts. The weight gradients sum
# over the rows and keep exact counts (``_mm_rows_summed``).
ROUNDED_DTYPES = (torch.bfloat16, torch.float16)
MIN_ROW_BLOCK = 8


def _row_block(dtype: torch.dtype, n: int) -> int:
    if dtype not in ROUNDED_DTYPES or n <= MIN_ROW_BLOCK:
        return 1
    return max(MIN_ROW_BLOCK, 1 << max(0, n.bit_length() - 5))  # 2^floor(log2 n) / 16


class _LoopGroupedSwiGLU(torch.autograd.Function):
    """Grouped SwiGLU over rows sorted by expert, one GEMM per expert and weight.

    Two modes. Plain (``token_M`` is None): ``x`` is x_MD, the rows themselves, and the result is
    y_MD. Routed: ``x`` is x_TD; row m of the computation is ``x_TD[token_M[m]]``, its output is
    scaled by ``weight_M[m]`` and added into row ``token_M[m]`` of an fp32 [T, D] result.

    Experts are taken in chunks of consecutive experts (``_chunks``; R rows per chunk): the
    GEMMs run per expert, everything else (gathers, SwiGLU elementwise work, gate, combine) once
    per chunk, in [R, D] / [R, I] work buffers allocated once per call and reused by every chunk.

    GEMMs whose rows are independent (every one but the weight gradients) may run over a row
    count rounded up to a block (``_row_block``): the extra rows read the next expert's (or
    spare) rows and write garbage into the next expert's output rows, which that expert, computed
    later in the same order, overwrites. Buffers carry spare rows (``_spare_rows``) for the last
    expert. Weight gradients sum over rows, so they use exact counts.
    """

    @staticmethod
    def forward(ctx, x, token_M, weight_M, w1_EID, w3_EID, w2_EDI, counts):  # type: ignore[override]
        routed = token_M is not None
        I, D = w1_EID.shape[1], w1_EID.shape[2]
        M = sum(counts)
        P = _spare_rows(x.dtype, counts)
        chunks = _chunks(counts, D * x.element_size())
        R = max((c1 - c0 for c0, c1, _ in chunks), default=0)
        g_MI = x.new_empty(M + P - 1, I)  # saved
        u_MI = x.new_empty(M + P - 1, I)  # saved
        h_MI = x.new_empty(M + P - 1, I)  # gated silu(g) * u, what w2 sees; saved
        if routed:
            out = torch.zeros(x.shape[0], D, dtype=torch.float32, device=x.device)
            x_buf = x.new_empty(R + P - 1, D)  # gathered rows of a chunk, then their outputs
            x_rows = y_rows = R + P - 1  # rows of the chunk's input and output buffers
        else:
            out = x.new_empty(M, D)
            x_rows = y_rows = M
        for c0, c1, spans in chunks:
            rows = slice(c0, c1)
            # xs / ys: the chunk's input and output rows from its first row to the buffer's end
            if routed:
                torch.index_select(x, 0, token_M[rows], out=x_buf[: c1 - c0])
                xs, base = x_buf, 0
            else:
                xs, base = x, c0
            for e, s, n in spans:
                r0 = s - c0 + base
                m = _rounded(n, x.dtype, min(x_rows - r0, M + P - 1 - s))
                torch.mm(xs[r0 : r0 + m], w1_EID[e].t(), out=g_MI[s : s + m])
                torch.mm(xs[r0 : r0 + m], w3_EID[e].t(), out=u_MI[s : s + m])
            h_RI = torch.mul(F.silu(g_MI[rows]), u_MI[rows], out=h_MI[rows])
            if weight_M is not None:
                # The gate scales the [R, I] input of the down projection rather than its wider
                # [R, D] output: the same product, fewer elements.
                h_RI.mul_(weight_M[rows].to(h_RI.dtype).unsqueeze(1))
            # Routed: the gathered rows are dead once g and u exist (backward gathers them
            # again), so the chunk's output overwrites them.
            ys = x_buf if routed else out
            for e, s, n in spans:
                r0 = s - c0 + base
                m = _rounded(n, x.dtype, min(y_rows - r0, M + P - 1 - s))
                torch.mm(h_MI[s : s + m], w2_EDI[e].t(), out=ys[r0 : r0 + m])
            if routed:
                # CPU index_add_ runs sequentially over the index, chunks in a fixed order:
                # a deterministic combine.
                out.index_add_(0, token_M[rows], x_buf[: c1 - c0].float())
        ctx.save_for_backward(x, token_M, weight_M, w1_EID, w3_EID, w2_EDI, g_MI, u_MI, h_MI)
        ctx.counts = counts
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, token_M, weight_M, w1, w3, w2, g_MI, u_MI, h_MI = ctx.saved_tensors
        need_x, _, need_w, need_w1, need_w3, need_w2, _ = ctx.needs_input_grad
        routed = token_M is not None
        counts = ctx.counts
        I, D = w1.shape[1], w1.shape[2]
        M = sum(counts)
        P = _spare_rows(x.dtype, counts)
        chunks = _chunks(counts, D * x.element_size())
        R = max((c1 - c0 for c0, c1, _ in chunks), default=0)
        idle = [e for e, n in enumerate(counts) if n == 0]
        gw1 = _empty_grad(w1, idle) if need_w1 else None
        gw3 = _empty_grad(w3, idle) if need_w3 else None
        gw2 = _empty_grad(w2, idle) if need_w2 else None
        gweight_M = torch.empty_like(weight_M) if need_w else None
        gx = None
        if need_x:
            gx = torch.zeros_like(x) if routed else torch.empty_like(x)
        if routed:
            # One [R, D] buffer holds a chunk's gathered gradient, then its gathered x, then its dx.
            rows_buf = x.new_empty(R + P - 1, D)
            d_rows = R + P - 1
            if grad_out.dtype != x.dtype:  # the fp32 gradient of a lower-precision layer: cast once
                grad_out = grad_out.to(x.dtype)
        else:
            grad_out = grad_out.contiguous()  # e.g. the stride-0 gradient of y.sum()
            d_rows = M
        dh_buf, da_buf = x.new_empty(R + P - 1, I), x.new_empty(R + P - 1, I)
        for c0, c1, spans in chunks:
            rows = slice(c0, c1)
            # grads / xs / gxs: [rows, D] from the chunk's first row (at ``base``) to the end
            if routed:
                torch.index_select(grad_out, 0, token_M[rows], out=rows_buf[: c1 - c0])
                grads, base = rows_buf, 0
            else:
                grads, base = grad_out, c0
            g_RI, u_RI = g_MI[rows], u_MI[rows]

            # Down projection; h_MI holds exactly what w2 saw (gate included).
            for e, s, n in spans:
                r0, r1 = s - c0 + base, s - c0
                m = _rounded(n, x.dtype, min(d_rows - r0, R + P - 1 - r1))
                torch.mm(grads[r0 : r0 + m], w2[e], out=dh_buf[r1 : r1 + m])
                if gw2 is not None:
                    _mm_rows_summed(grads[r0 : r0 + n].t(), h_MI[s : s + n], gw2[e])

            # SwiGLU and gate. With a = silu(g) and gated h = w * a * u:
            #   dL/dw = sum_i dh * a * u,   dL/du = dh * w * a,   dL/da = dh * w * u.
            dh_RI = dh_buf[: c1 - c0]
            a_RI = F.silu(g_RI)
            da_RI = torch.mul(dh_RI, u_RI, out=da_buf[: c1 - c0])
            if weight_M is not None:
                w_R1 = weight_M[rows].to(dh_RI.dtype).unsqueeze(1)
                if gweight_M is not None:
                    # Row-wise dot products, accumulated in fp32 (a multiply and a sum run 20x
                    # faster here than the same as a batched [1, I] @ [I, 1] GEMM).
                    gweight_M[rows] = torch.mul(da_RI, a_RI).sum(1, dtype=torch.float32)
                da_RI.mul_(w_R1)
                dh_RI.mul_(w_R1)
            dh_RI.mul_(a_RI)  # now du
            del a_RI
            torch.ops.aten.silu_backward.grad_input(da_RI, g_RI, grad_input=da_RI)  # now dg
            dg_buf, du_buf = da_buf, dh_buf

            # Gate and up projections. Routed: the chunk's gradient rows are dead now, so x is
            # gathered into their buffer; every expert's weight gradients read it before any dx
            # overwrites it.
            if routed:
                torch.index_select(x, 0, token_M[rows], out=rows_buf[: c1 - c0])
                xs = gxs = rows_buf
            else:
                xs, gxs = x, gx
            for e, s, n in spans:
                r0, r1 = s - c0 + base, s - c0
                if gw1 is not None:
                    _mm_rows_summed(dg_buf[r1 : r1 + n].t(), xs[r0 : r0 + n], gw1[e])
                if gw3 is not None:
                    _mm_rows_summed(du_buf[r1 : r1 + n].t(), xs[r0 : r0 + n], gw3[e])
            if gx is not None:
                for e, s, n in spans:
                    r0, r1 = s - c0 + base, s - c0
                    m = _rounded(n, x.dtype, min(d_rows - r0, R + P - 1 - r1))
                    torch.mm(dg_buf[r1 : r1 + m], w1[e], out=gxs[r0 : r0 + m]).addmm_(du_buf[r1 : r1 + m], w3[e])
            if routed and gx is not None:
                gx.index_add_(0, token_M[rows], rows_buf[: c1 - c0])
        return gx, None, gweight_M, gw1, gw3, gw2, None


def _rounded(n: int, dtype: torch.dtype, available: int) -> int:
    """``n`` rounded up to its row block (``_row_block``), but no more than ``available`` rows."""
    block = _row_block(dtype, n)
    return min(-(-n // block) * block, available)


# Weight gradients sum over an expert's rows, so their row count cannot be rounded. Where the
# gradient is small (below this many elements: the tiny presets' 11K, not the 2B's 1.1M or the
# 16B's 2.9M) they run as a multiple of SUM_BLOCK rows plus the remainder, two GEMMs of a few
# cached shapes; the second re-reads and re-writes the gradient, which costs more than compiling
# a kernel where the gradient is big.
SUM_SPLIT_BELOW = 1 << 18
SUM_BLOCK = 32


def _mm_rows_summed(a_KN: torch.Tensor, b_NL: torch.Tensor, out_KL: torch.Tensor) -> None:
    """``out = a @ b``, summing over N rows (see ``SUM_SPLIT_BELOW``)."""
    n = a_KN.shape[1]
    q = n // SUM_BLOCK * SUM_BLOCK
    if a_KN.dtype not in ROUNDED_DTYPES or out_KL.numel() >= SUM_SPLIT_BELOW or q in (0, n):
        torch.mm(a_KN, b_NL, out=out_KL)
        return
    torch.mm(a_KN[:, :q], b_NL[:q], out=out_KL)
    out_KL.addmm_(a_KN[:, q:], b_NL[q:])


def _spare_rows(dtype: torch.dtype, counts: list[int]) -> int:
    """Rows the buffers need past their end: the most any expert's count is rounded up by, + 1."""
    return max((_row_block(dtype, n) for n in counts), default=1)


def _spans(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, rows) for every expert that has rows."""
    spans, s = [], 0
    for e, n in enumerate(counts):
        if n:
            spans.append((e, s, n))
        s += n
    return spans


# Work buffers of at most this many bytes per [R, D] chunk. Below glibc's 32 MB mmap limit, so
# the allocator keeps recycling them; big enough that the non-GEMM ops run a few times per call.
CHUNK_BYTES = 24 << 20


def _chunks(counts: list[int], row_bytes: int) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """Consecutive experts grouped into (first row, end row, spans) of at most CHUNK_BYTES."""
    max_rows = max(1, CHUNK_BYTES // row_bytes)
    chunks: list[tuple[int, int, list[tuple[int, int, int]]]] = []
    for e, s, n in _spans(counts):
        if chunks and chunks[-1][1] - chunks[-1][0] + n <= max_rows:
            c0, _, spans = chunks[-1]
            chunks[-1] = (c0, s + n, spans + [(e, s, n)])
        else:
            chunks.append((s, s + n, [(e, s, n)]))
    return chunks


def _empty_grad(w: torch.Tensor, idle: list[int]) -> torch.Tensor:
    # Every expert with rows overwrites its slice, so only idle experts need zeros.
    g = torch.empty_like(w)
    if idle:
        g[idle] = 0
    return g


# Padded buckets: where an expert's GEMMs are small (the tiny presets: 128 x 88), one GEMM per
# expert costs several times its arithmetic in call overhead, above all in bf16 (oneDNN: 63 calls
# of 455 x 128 x 88 take 2.3x one batched call of the same work). Experts are then grouped into
# buckets of similar row counts and each bucket runs as one batched GEMM over rows padded to the
# bucket's largest count. The padding is bounded by BUCKET_TOLERANCE (the smallest count in a
# bucket is at least this close to the largest) plus the bf16 row rounding.
BUCKET_TOLERANCE = 0.125
# Experts whose weights (I x D) have fewer elements run as padded buckets on the CPU (the tiny
# presets, 11K-68K); bigger ones (the 2B's 1.1M) run a GEMM each (``loop``), as fast per FLOP as
# a batched call and without padding or copies of the weights.
PADDED_BELOW = 1 << 18


def _buckets(counts: list[int], dtype: torch.dtype) -> tuple[list[tuple[int, int, list[int]]], list[int], int]:
    """The padded layout: ``(buckets, first_E, P)``. Each bucket is ``(first padded row, C,
    experts)``: experts with rows, largest count first, whose counts are within BUCKET_TOLERANCE
    of the bucket's largest, each given C rows (that count, rounded up to its bf16 row block).
    ``first_E[e]``: expert e's first padded row; P: padded rows in all."""
    order = sorted((e for e, n in enumerate(counts) if n), key=lambda e: -counts[e])
    groups: list[list[int]] = []
    for e in order:
        if groups and counts[e] >= counts[groups[-1][0]] * (1 - BUCKET_TOLERANCE):
            groups[-1].append(e)
        else:
            groups.append([e])
    buckets, first_E, P = [], [0] * len(counts), 0
    for experts in groups:
        C = _rounded(counts[experts[0]], dtype, 1 << 62)
        buckets.append((P, C, experts))
        for i, e in enumerate(experts):
            first_E[e] = P + i * C
        P += C * len(experts)
    return buckets, first_E, P


class _PaddedGroupedSwiGLU(torch.autograd.Function):
    """The grouped SwiGLU as batched GEMMs over padded buckets of experts (``_buckets``).

    The same two modes, inputs and result as ``_LoopGroupedSwiGLU``. Row p of the padded layout
    reads row ``src_P[p]`` of ``x`` (``token_M`` of its assignment when routed, else the
    assignment itself) and carries gate ``gate_P[p]`` (the assignment's gate, 1 without gates).
    Padding rows read row 0 with gate 0: their gated activations are exactly 0, so they add 0 to
    every output and every weight gradient, and their input gradients are 0. Each bucket's
    weights are gathered (``index_select``) once, for its batched GEMMs forward and backward;
    their gradients are written into the stacked gradient, and experts without rows get zeros.
    """

    @staticmethod
    def forward(ctx, x, token_M, weight_M, w1_EID, w3_EID, w2_EDI, counts):  # type: ignore[override]
        routed = token_M is not None
        dev, D, I = x.device, w1_EID.shape[2], w1_EID.shape[1]
        buckets, first_E, P = _buckets(counts, x.dtype)
        M = sum(counts)
        counts_E = torch.tensor(counts, device=dev)
        expert_M = torch.repeat_interleave(torch.arange(len(counts), device=dev), counts_E, output_size=M)
        shift_E = torch.tensor(first_E, device=dev) - (torch.cumsum(counts_E, 0) - counts_E)
        pos_M = torch.arange(M, device=dev) + shift_E.index_select(0, expert_M)  # padded row of each
        src_M = token_M if routed else torch.arange(M, device=dev)
        src_P = torch.zeros(P, dtype=torch.long, device=dev).index_copy_(0, pos_M, src_M)
        gate_M = weight_M if weight_M is not None else torch.ones(M, device=dev)
        gate_P = torch.zeros(P, dtype=x.dtype, device=dev).index_copy_(0, pos_M, gate_M.to(x.dtype))

        xy_PD = x.index_select(0, src_P)  # the padded rows, then their outputs
        # gate_proj and up_proj as one product of twice the width ([w1; w3], [n, 2I, D] per
        # bucket): half the calls, and the wider GEMM runs faster per FLOP at these small sizes.
        gu_PJ = x.new_empty(P, 2 * I)
        # Per bucket: its padded rows, experts and rows per expert, and its gathered weights
        # (kept for backward).
        parts = [(slice(p0, p0 + C * len(experts)), len(experts), C, torch.tensor(experts, device=dev))
                 for p0, C, experts in buckets]
        w13_EJD = torch.cat([w1_EID, w3_EID], 1)
        ws = [(w13_EJD.index_select(0, idx), w2_EDI.index_select(0, idx)) for *_, idx in parts]
        del w13_EJD
        for (rows, n, C, _), (w13, _) in zip(parts, ws):
            torch.bmm(xy_PD[rows].view(n, C, D), w13.transpose(1, 2), out=gu_PJ[rows].view(n, C, 2 * I))
        g_PI, u_PI = gu_PJ[:, :I], gu_PJ[:, I:]
        h_PI = torch.mul(F.silu(g_PI), u_PI).mul_(gate_P.unsqueeze(1))  # gated, what w2 sees
        for (rows, n, C, _), (_, w2) in zip(parts, ws):
            torch.bmm(h_PI[rows].view(n, C, I), w2.transpose(1, 2), out=xy_PD[rows].view(n, C, D))
        if routed:
            # Padding rows are exact zeros; CPU index_add_ runs sequentially: deterministic.
            out = torch.zeros(x.shape[0], D, dtype=torch.float32, device=dev)
            out.index_add_(0, src_P, xy_PD.float())
        else:
            out = xy_PD.index_select(0, pos_M)
        ctx.save_for_backward(x, src_P, gate_P, pos_M, w1_EID, w3_EID, w2_EDI, gu_PJ, h_PI)
        ctx.layout = parts, ws, counts, weight_M is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, src_P, gate_P, pos_M, w1_EID, w3_EID, w2_EDI, gu_PJ, h_PI = ctx.saved_tensors
        need_x, _, need_w, need_w1, need_w3, need_w2, _ = ctx.needs_input_grad
        parts, ws, counts, gated = ctx.layout
        D = w1_EID.shape[2]
        idle = [e for e, n in enumerate(counts) if n == 0]
        gw1 = _empty_grad(w1_EID, idle) if need_w1 else None
        gw3 = _empty_grad(w3_EID, idle) if need_w3 else None
        gw2 = _empty_grad(w2_EDI, idle) if need_w2 else None
        # The output gradient of every padded row (padding: row 0's, inert under gate 0).
        buf_PD = grad_out.to(x.dtype).index_select(0, src_P)
        I = h_PI.shape[1]
        g_PI, u_PI = gu_PJ[:, :I], gu_PJ[:, I:]
        dh_PI = torch.empty_like(h_PI)
        for (rows, n, C, idx), (_, w2) in zip(parts, ws):
            dy = buf_PD[rows].view(n, C, D)
            torch.bmm(dy, w2, out=dh_PI[rows].view(n, C, -1))
            if gw2 is not None:
                gw2.index_copy_(0, idx, torch.bmm(dy.transpose(1, 2), h_PI[rows].view(n, C, -1)))
        # SwiGLU and gate, as in _LoopGroupedSwiGLU: with a = silu(g) and gated h = w * a * u,
        # dL/dw = sum_i dh * a * u,   dL/du = dh * w * a,   dL/da = dh * w * u.
        a_PI = F.silu(g_PI)
        da_PI = torch.mul(dh_PI, u_PI)
        gweight_M = None
        if need_w and gated:
            gweight_M = torch.mul(da_PI, a_PI).sum(1, dtype=torch.float32).index_select(0, pos_M)
        w_P1 = gate_P.unsqueeze(1)
        dgu_PJ = torch.empty_like(gu_PJ)  # [dg, du]: the gradient of [w1; w3]'s product
        torch.mul(dh_PI.mul_(w_P1), a_PI, out=dgu_PJ[:, I:])
        torch.ops.aten.silu_backward.grad_input(da_PI.mul_(w_P1), g_PI, grad_input=dgu_PJ[:, :I])
        del a_PI, da_PI, dh_PI
        torch.index_select(x, 0, src_P, out=buf_PD)  # the padded input rows again
        for (rows, n, C, idx), (w13, _) in zip(parts, ws):
            xb, dgu = buf_PD[rows].view(n, C, D), dgu_PJ[rows].view(n, C, 2 * I)
            if gw1 is not None or gw3 is not None:
                gw13 = torch.bmm(dgu.transpose(1, 2), xb)
                if gw1 is not None:
                    gw1.index_copy_(0, idx, gw13[:, :I])
                if gw3 is not None:
                    gw3.index_copy_(0, idx, gw13[:, I:])
            if need_x:  # the input rows are dead once this bucket's weight gradients exist
                torch.bmm(dgu, w13, out=xb)
        gx = torch.zeros_like(x).index_add_(0, src_P, buf_PD) if need_x else None
        return gx, None, gweight_M, gw1, gw3, gw2, None


class _GateUpCast(torch.autograd.Function):
    """(w1 [E, I, D], w3 [E, I, D]) -> w13 [E, 2I, D] in ``dtype``, each expert's gate rows then
    its up rows, in one cast pass (what ``w.to(dtype)`` of each costs); the backward casts the two
    halves of the gradient back. The fused form of the ``threaded`` backend's weights, built where
    autocast casts the weights anyway."""

    @staticmethod
    def forward(ctx, w1_EID, w3_EID, dtype):  # type: ignore[override]
        E, I, D = w1_EID.shape
        w13 = w1_EID.new_empty((E, 2 * I, D), dtype=dtype)
        w13[:, :I].copy_(w1_EID)
        w13[:, I:].copy_(w3_EID)
        ctx.dtypes = w1_EID.dtype, w3_EID.dtype
        return w13

    @staticmethod
    @once_differentiable
    def backward(ctx, g13):  # type: ignore[override]
        I = g13.shape[1] // 2
        return (g13[:, :I].to(ctx.dtypes[0], memory_format=torch.contiguous_format),
                g13[:, I:].to(ctx.dtypes[1], memory_format=torch.contiguous_format), None)


class _ThreadedGroupedSwiGLU(torch.autograd.Function):
    """The grouped SwiGLU with one expert per thread (the package's ``grouped_swiglu`` kernel):
    each thread gathers an expert's rows, runs its three GEMMs and the gated SwiGLU in buffers that
    stay in its cache, and takes the next expert when done; the combine sums each token's rows in
    row order (deterministic). The same two modes, inputs and result as ``_LoopGroupedSwiGLU``;
    rows are padded per expert to the bf16 row blocks (``_rounded``) with zero rows. With
    ``w3_EID`` None, ``w1_EID`` is the fused w13 [E, 2I, D] (``_GateUpCast``): one GEMM for both up
    projections, one for their input gradient and one for their weight gradient."""

    @staticmethod
    def forward(ctx, x, token_M, weight_M, w1_EID, w3_EID, w2_EDI, counts):  # type: ignore[override]
        pads = [_rounded(n, x.dtype, 1 << 62) for n in counts]
        gate_M = None if weight_M is None else weight_M.float().contiguous()
        ws = [None if w is None else w.contiguous() for w in (w1_EID, w3_EID, w2_EDI)]
        x = x.contiguous()
        out, g_PI, u_PI = kernels.grouped_swiglu(x, token_M, gate_M, *ws, counts, pads)
        ctx.save_for_backward(x, token_M, gate_M, *ws, g_PI, u_PI)
        ctx.layout = counts, pads, weight_M.dtype if weight_M is not None else None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, token_M, gate_M, w1, w3, w2, g_PI, u_PI = ctx.saved_tensors
        need_x, _, need_w, need_w1, need_w3, need_w2, _ = ctx.needs_input_grad
        counts, pads, gate_dtype = ctx.layout
        if grad_out.dtype not in (torch.float32, x.dtype):
            grad_out = grad_out.float()
        gx, ggate, gw1, gw3, gw2 = kernels.grouped_swiglu_backward(
            grad_out.contiguous(), x, token_M, gate_M, w1, w3, w2, g_PI, u_PI, counts, pads,
            need_x, need_w, need_w1 or need_w3 or need_w2)
        if ggate is not None:
            ggate = ggate.to(gate_dtype)
        return (gx, None, ggate, gw1 if need_w1 else None, gw3 if need_w3 else None,
                gw2 if need_w2 else None, None)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's lower precision when autocast is on for
    ``x``'s device and ``x`` is a float of higher precision, else ``x``'s own dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype == torch.float32:
        return torch.get_autocast_dtype(dev)
    return x.dtype


# --- backends of the experts stage -----------------------------------------------------------
# Each maps (x_MD rows sorted by expert, counts_E, gate_M or None, w1, w3, w2), all in one dtype,
# to y_MD = gate * expert(x) per row, the gate scaling the input of the down projection.

def _reference_rows(x_MD, counts_E, gate_M, w1, w3, w2):
    """One expert at a time with plain autograd: the readable backend."""
    out, s = [], 0
    for e, n in enumerate(counts_E.tolist()):
        rows = x_MD[s:s + n]
        h = F.silu(rows @ w1[e].t()) * (rows @ w3[e].t())
        if gate_M is not None:
            h = h * gate_M[s:s + n].to(h.dtype).unsqueeze(1)
        out.append(h @ w2[e].t())
        s += n
    return torch.cat(out) if out else x_MD.new_zeros(0, w2.shape[1])


def _loop_rows(x_MD, counts_E, gate_M, w1, w3, w2):
    """One GEMM per expert into preallocated buffers (``_LoopGroupedSwiGLU``); CPU's choice."""
    counts = counts_E.tolist()  # the one host synchronisation of this backend
    return _LoopGroupedSwiGLU.apply(x_MD, None, gate_M, w1, w3, w2, counts)


def _grouped_mm_rows(x_MD, counts_E, gate_M, w1, w3, w2):
    """``torch.nn.functional.grouped_mm`` with the group offsets on the device: no host
    synchronisation, and it compiles with ``fullgraph=True``."""
    offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
    g = F.grouped_mm(x_MD, w1.transpose(-2, -1), offs=offs)
    u = F.grouped_mm(x_MD, w3.transpose(-2, -1), offs=offs)
    h = F.silu(g) * u
    if gate_M is not None:
        h = h * gate_M.to(h.dtype).unsqueeze(1)
    return F.grouped_mm(h, w2.transpose(-2, -1), offs=offs)


def _threaded_usable(x: torch.Tensor) -> bool:
    """Whether the ``threaded`` backend can serve ``x``: a CPU tensor of fp32 or bf16 compute
    dtype, and the package's kernels loaded."""
    return (x.device.type == "cpu" and compute_dtype(x) in (torch.float32, torch.bfloat16)
            and kernels.library_reason() is None)


def _threaded_rows(x_MD, counts_E, gate_M, w1, w3, w2):
    """One expert per thread, everything for an expert in its thread's cache
    (``_ThreadedGroupedSwiGLU``); CPU's choice where the package's kernels load."""
    counts = counts_E.tolist()  # the one host synchronisation of this backend
    return _ThreadedGroupedSwiGLU.apply(x_MD, None, gate_M, w1, w3, w2, counts)


def _padded_rows(x_MD, counts_E, gate_M, w1, w3, w2):
    """Experts in buckets of similar row counts, each bucket zero-gated to a common count and run
    as batched GEMMs (``_PaddedGroupedSwiGLU``); CPU's choice for small experts."""
    counts = counts_E.tolist()  # the one host synchronisation of this backend
    return _PaddedGroupedSwiGLU.apply(x_MD, None, gate_M, w1, w3, w2, counts)


BACKENDS = {"reference": _reference_rows, "loop": _loop_rows, "grouped_mm": _grouped_mm_rows,
            "padded": _padded_rows, "threaded": _threaded_rows}
# Backends whose autograd function also runs the gather and the combine (``routed_forward``).
FUSED = {"loop": _LoopGroupedSwiGLU, "padded": _PaddedGroupedSwiGLU, "threaded": _ThreadedGroupedSwiGLU}


class GroupedExperts(nn.Module):
    """``n_experts`` SwiGLU experts of width ``intermediate_size``, stored stacked.

    ``forward(x_MD, counts_E, gate_M)`` is the experts stage of the dispatch pipeline
    (``moe.dispatch``): rows sorted by expert in, gated rows out. Expert parallelism wraps exactly
    this call with forward hooks. ``backend`` picks its computation (``"auto"``: ``grouped_mm``
    for bf16 on CUDA; on the CPU ``threaded`` where the package's kernels load, else ``padded``
    for small experts and ``loop`` for large ones; or any name of ``BACKENDS``).
    """

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, backend: str = "auto"):
        super().__init__()
        self.n_experts = n_experts
        self.backend = backend
        self.w1 = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))  # gate
        self.w3 = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))  # down

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on ``x_ND`` with plain autograd (the readable reference)."""
        w1, w3, w2 = (self.weight(n) for n in ("w1", "w3", "w2"))
        return F.linear(F.silu(F.linear(x_ND, w1[e])) * F.linear(x_ND, w3[e]), w2[e])

    def weight(self, name: str) -> torch.Tensor:
        """Stacked weight ``name`` (w1, w3 or w2) as the experts compute with it: the parameter,
        plus its LoRA update when the model carries adapters (``deepseek_moe.lora``)."""
        w = getattr(self, name)
        adapters = getattr(self, "adapters", None)
        if adapters is not None and name in adapters:
            w = w + adapters[name].delta().to(w.dtype)
        return w

    def resolve_backend(self, x: torch.Tensor) -> str:
        """The backend this call uses (``auto``: ``grouped_mm`` for bf16 on CUDA; on the CPU
        ``threaded`` where the package's kernels load, else ``padded`` for small experts
        (``PADDED_BELOW``) and ``loop`` for large ones); validates the name."""
        if self.backend == "auto":
            if x.is_cuda:
                return "grouped_mm" if compute_dtype(x) == torch.bfloat16 else "loop"
            if _threaded_usable(x):
                return "threaded"
            E, I, D = self.w1.shape
            return "padded" if I * D < PADDED_BELOW else "loop"
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown grouped-experts backend {self.backend!r}; "
                             f"choose from auto, {', '.join(BACKENDS)}")
        return self.backend

    def local_weights(self, dtype: torch.dtype, fuse: bool = False
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """(w1, w3, w2) in ``dtype``, as plain tensors: the experts this process holds. Under expert
        parallelism the parameters are DTensors sharded over experts, and the computation runs on
        the local shard (``to_local`` is differentiable, so gradients reach the DTensor). With
        ``fuse``, where the weights are cast anyway (autocast), (w13, None, w2): w1 and w3 cast into
        one [E, 2I, D] tensor (``_GateUpCast``) for the ``threaded`` backend."""
        w1, w3, w2 = (w.to_local() if hasattr(w, "to_local") else w for w in map(self.weight, ("w1", "w3", "w2")))
        if fuse and w1.dtype != dtype and w3.dtype != dtype:
            return _GateUpCast.apply(w1, w3, dtype), None, w2.to(dtype)
        return w1.to(dtype), w3.to(dtype), w2.to(dtype)

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor,
                gate_M: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows sorted by expert (``counts_E[e]`` rows for local expert ``e``), optional fp32
        gates -> ``gate * expert(row)`` [M, D] in the compute dtype."""
        dtype = compute_dtype(x_MD)
        backend = self.resolve_backend(x_MD)
        with torch.autocast(x_MD.device.type, enabled=False):
            return BACKENDS[backend](x_MD.to(dtype), counts_E, gate_M,
                                     *self.local_weights(dtype, fuse=backend == "threaded"))

    def fuses_dispatch(self, x_TD: torch.Tensor) -> bool:
        """Whether ``routed_forward`` serves this call: the ``loop``, ``padded`` or ``threaded``
        backend on the CPU, with nothing wrapping the experts stage (expert parallelism's hooks need the plain
        stage)."""
        return (x_TD.device.type == "cpu" and self.resolve_backend(x_TD) in FUSED
                and not self._forward_pre_hooks and not self._forward_hooks)

    def routed_forward(self, x_TD: torch.Tensor, token_M: torch.Tensor, gate_M: torch.Tensor,
                       counts_E: torch.Tensor) -> torch.Tensor:
        """Gather, experts, gate and combine in one autograd node (the fused ``loop``, ``padded``
        and ``threaded`` backends).

        Row m (sorted by expert, ``counts_E[e]`` per expert) sends token ``token_M[m]`` with gate
        ``gate_M[m]``; returns fp32 [T, D] with
        ``out[t] = sum over m with token_M[m] == t of expert(m)(x_TD[t]) * gate_M[m]``.
        The gate multiplies inside the expert (in the compute dtype); the sum is fp32.
        """
        dtype = compute_dtype(x_TD)
        fn = FUSED[self.resolve_backend(x_TD)]
        counts = counts_E.tolist()  # the one host synchronisation of this path
        with torch.autocast(x_TD.device.type, enabled=False):
            return fn.apply(x_TD.to(dtype), token_M, gate_M,
                            *self.local_weights(dtype, fuse=fn is _ThreadedGroupedSwiGLU), counts)

    def few_tokens(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                   shared: Optional[nn.Module] = None) -> Optional[torch.Tensor]:
        """The three stages at once for a few tokens, skipping the permutation: None here (the
        stacked experts have no such path; ``ExpertList`` has, for quantized decoding)."""
        return None

    def extra_repr(self) -> str:
        E, I, D = self.w1.shape
        return f"experts={E}, hidden={D}, intermediate={I}, backend={self.backend}"


# ExpertList -> (storage generation, shared experts, table): outside the modules, so that a model
# is copied and saved as before (the library's table has no state to copy).
_EXPERT_TABLES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


class ExpertList(nn.ModuleList):
    """The routed experts as one ``SwiGLU`` module each, stored as the released checkpoint stores
    them (``mlp.experts.{e}.gate_proj.weight`` ...): the same experts stage as ``GroupedExperts``
    (``forward(x_MD, counts_E, gate_M)``) for weights that cannot be stacked without a copy.

    A checkpoint's per-expert tensors are assigned as they are, memory-mapped from the file in
    their stored dtype, so a model larger than the memory stacking would need still loads
    (``checkpoint.load_pretrained(..., experts="per-expert")``). Every expert is its own tensor,
    so plain autograd serves (no full-size gradient per expert) and it trains, but the stacked
    ``GroupedExperts`` is the fast training layout; expert parallelism needs it.
    """

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int):
        from ..ffn import SwiGLU

        super().__init__(SwiGLU(hidden_size, intermediate_size) for _ in range(n_experts))
        self.n_experts = n_experts

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        return self[e](x_ND)

    def fuses_dispatch(self, x_TD: torch.Tensor) -> bool:
        return False

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor,  # type: ignore[override]
                gate_M: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows sorted by expert (``counts_E[e]`` rows for expert ``e``), optional fp32 gates ->
        ``gate * expert(row)`` [M, D]. Each expert's modules compute as they do alone (autocast
        applies to plain linear layers; quantized ones compute in bf16), except that quantized
        experts given few rows each (decoding) run as two calls of the package's kernel for all
        of them: gate and up projections, then the down projections (fp32 result)."""
        counts = counts_E.tolist()  # one host synchronisation
        used = [e for e, n in enumerate(counts) if n]
        fused = self._quantized_few_rows(x_MD, used, [counts[e] for e in used], gate_M)
        if fused is not None:
            return fused
        out, s = [], 0
        for e, n in enumerate(counts):
            if n:
                m, rows = self[e], x_MD[s:s + n]
                h = F.silu(m.gate_proj(rows)) * m.up_proj(rows)
                if gate_M is not None:
                    h = h * gate_M[s:s + n].to(h.dtype).unsqueeze(1)
                out.append(m.down_proj(h))
            s += n
        if not out:
            return x_MD.new_zeros(0, self[0].down_proj.out_features)
        return torch.cat(out) if len(out) > 1 else out[0]

    def few_tokens(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                   shared: Optional[nn.Module] = None) -> Optional[torch.Tensor]:
        """Permute, experts and combine at once for a few tokens of a quantized model (decoding),
        as the package's kernel allows: its rows need not be sorted or gathered (each weight
        names its own rows of ``x_TD``; one token's rows are the token itself), so the
        permutation's sort, gathers and scatter are left out. Returns what ``dispatch`` returns
        for these assignments without a capacity, fp32 [T, D] and equal to it bit for bit (the
        same products, the gate applied the same way, each token's K rows summed in k order);
        None where it does not serve (gradients, unquantized experts, more than
        ``quant.GEMV_ROWS`` tokens, no kernel).

        ``shared``: the layer's shared experts (one SwiGLU ``n`` experts wide, eq. 9's first
        sum), taken in the same two calls as ``n`` more experts of gate 1 (``shared_pieces``),
        for at most ``quant.FUSED_ROWS`` tokens; their output is then added to the result (fp32,
        rounded by the caller once), and None returned where they cannot be taken so."""
        T, K = topk_ids_TK.shape
        if (T == 0 or T > GEMV_ROWS or torch.is_grad_enabled() or x_TD.device.type != "cpu"
                or not isinstance(self[0].gate_proj, QuantLinear)):
            return None
        pieces = None
        if shared is not None:
            pieces = self.shared_pieces(shared)
            if pieces is None or T > FUSED_ROWS:
                return None
        x_TD = x_TD.to(compute_dtype(x_TD))  # the rows as dispatch gathers them
        ids = topk_ids_TK.tolist()  # one host synchronisation
        if T == 1 and len(set(ids[0])) == K:  # every row is the token itself, in assignment order
            return self._one_token(x_TD, ids[0], topk_weights_TK.reshape(-1), pieces,
                                   None if shared is None else shared._modules["down_proj"])
        # Assignments grouped by expert, experts in order of first appearance in the k-major
        # assignment order (a = k * T + t), rows within an expert in that order too.
        groups: dict[int, list[int]] = {}
        for k in range(K):
            for t in range(T):
                groups.setdefault(ids[t][k], []).append(k * T + t)
        order = [a for rows in groups.values() for a in rows]  # grouped row -> assignment
        ns = [len(rows) for rows in groups.values()]
        used = list(groups)
        order_M = torch.tensor(order, device=x_TD.device)
        x_MD = x_TD.index_select(0, order_M % T)
        gate_M = topk_weights_TK.t().reshape(-1).index_select(0, order_M)
        inverse = [0] * len(order)
        for m, a in enumerate(order):
            inverse[a] = m
        M = len(order)
        if pieces is not None:  # the shared experts read the tokens' rows: after the routed ones
            x_MD = torch.cat([x_MD, x_TD])
        y_MD = self._quantized_few_rows(x_MD, used, ns, gate_M, shared=pieces, shared_rows=(M, T))
        if y_MD is None:
            return None
        routed = y_MD[:M].index_select(0, torch.tensor(inverse, device=x_TD.device))
        y_TD = routed.view(K, T, -1).sum(0, dtype=torch.float32)
        if pieces is not None:
            y_TD = y_TD + y_MD[M:].view(len(pieces[2]), T, -1).sum(0)
        return y_TD

    def _one_token(self, x_1D: torch.Tensor, used: list[int], gate_K: torch.Tensor,
                   shared: "Optional[tuple[list, list, list]]", shared_down: Optional[nn.Module]) -> Optional[torch.Tensor]:
        """One token's routed experts ``used`` (k order, gates ``gate_K``) and the shared pieces
        in one operation of the package's kernel (``kernels.experts_one_token``): fp32 [1, D], the
        gated routed outputs summed in k order, plus the shared experts'. The routed products of
        the two-call path; the shared experts' down projection ``shared_down`` whole, one stream
        of memory (its pieces would read every row twice); the SwiGLU computed by the kernel (e^x
        within about 2 ulp of torch's)."""
        experts = list(self._modules.values())  # (the modules' dicts: the fast way in)
        ins = ([experts[e]._modules["gate_proj"] for e in used] + (shared[0] if shared else [])
               + [experts[e]._modules["up_proj"] for e in used] + (shared[1] if shared else []))
        outs = [experts[e]._modules["down_proj"] for e in used] + (shared[2] if shared else [])
        if not (gemv_usable(ins, 1, x_1D) and gemv_usable(outs, 1, x_1D)):
            return None
        if shared:
            outs = outs[:len(used)] + [shared_down]
        return kernels.experts_one_token(x_1D, *kernel_args(ins), *kernel_args(outs), gate_K.float().contiguous(),
                                         ins[0].bits, ins[0].group_size, outs[0].group_size)

    def expert_table(self, shared: nn.Module) -> Optional[tuple[object, int, int, int]]:
        """The stored tensors of every routed expert and of the shared experts' pieces
        (``shared_pieces``) held by the package's library (``kernels.expert_table``), for one
        token's whole block in one operation (``DeepseekMoE.decode_block``): (table, bits, group,
        down projections' group). Built once and kept while no quantized layer's tensors change
        (``quant.storage_generation``); None where the kernel cannot take these experts (not
        quantized alike, shapes it does not serve, no kernel)."""
        kept = _EXPERT_TABLES.get(self)
        generation = storage_generation()
        if kept is not None and kept[0] == generation and kept[1] is shared:
            return kept[2]
        table = None
        pieces = self.shared_pieces(shared)
        if pieces is not None:
            experts = list(self._modules.values())
            projections = [[e._modules[name] for e in experts] + list(cut)
                           for name, cut in zip(("gate_proj", "up_proj", "down_proj"), pieces)]
            first, down = projections[0][0], projections[2][0]
            x = torch.empty(1, 0)
            if (gemv_usable(projections[0] + projections[1], 1, x) and gemv_usable(projections[2], 1, x)
                    and down.bits == first.bits):
                projections[2][len(experts):] = [shared._modules["down_proj"]]  # whole: see _one_token
                tensors = []
                for layers in projections:
                    for m in layers:
                        tensors += [a[0] for a in kernel_args([m]) if a]  # weight, scale (, zero)
                per = 2 if first.bits == 8 else 3
                table = (kernels.expert_table(tensors, len(experts), len(pieces[0]), per), first.bits,
                         first.group_size, down.group_size)
        _EXPERT_TABLES[self] = (generation, shared, table)
        return table

    def shared_pieces(self, shared: nn.Module) -> "Optional[tuple[list, list, list]]":
        """The shared experts (a SwiGLU ``n`` times an expert's width) as ``n`` expert-shaped
        pieces: gate and up projections cut by their outputs, the down projection by its inputs
        (views of the stored tensors, ``QuantLinear.pieces``), so that piece ``p`` computes the
        intermediate channels ``p*I .. (p+1)*I`` and the down projection sums the pieces' results
        as its own product does. None where they are not quantized as the routed experts are, or
        do not cut so."""
        parts = shared._modules  # (the modules' dicts: the fast way in)
        gate, up, down = parts.get("gate_proj"), parts.get("up_proj"), parts.get("down_proj")
        first = next(iter(self._modules.values()))._modules["gate_proj"]
        if not all(isinstance(m, QuantLinear) for m in (gate, up, down, first)):
            return None
        width = first.out_features
        n = gate.out_features // width
        if n * width != gate.out_features or (gate.bits, gate.group_size) != (first.bits, first.group_size):
            return None
        cut = gate.pieces(n, 0), up.pieces(n, 0), down.pieces(n, 1)
        return None if any(c is None for c in cut) else cut  # type: ignore[return-value]

    def _quantized_few_rows(self, x_MD: torch.Tensor, used: list[int], ns: list[int],
                            gate_M: Optional[torch.Tensor], shared: "Optional[tuple[list, list, list]]" = None,
                            shared_rows: Optional[tuple[int, int]] = None) -> Optional[torch.Tensor]:
        """``gate * expert(row)`` [M, D] fp32 through ``quant.gemv``: the experts ``used``, in
        that order, ``ns[i]`` consecutive rows each (M = sum(ns)). ``shared``: pieces
        (``shared_pieces``) that take the rows ``shared_rows`` = (first, count) of ``x_MD`` each,
        with gate 1, in the same two calls; their rows follow the M routed ones, piece by piece.
        None where it does not serve (unquantized experts, many rows, or no kernel)."""
        if torch.is_grad_enabled() or not used or not isinstance(self[0].gate_proj, QuantLinear):
            return None
        experts = list(self._modules.values())  # (the modules' dicts: the fast way in)
        gates = [experts[e]._modules["gate_proj"] for e in used]
        ups = [experts[e]._modules["up_proj"] for e in used]
        outs = [experts[e]._modules["down_proj"] for e in used]
        M = sum(ns)
        starts = [0, *itertools.accumulate(ns)][:-1]
        in_starts, in_ns, out_starts, out_ns = starts, ns, starts, ns
        if shared is not None:
            assert shared_rows is not None
            first, count = shared_rows
            P = len(shared[0])
            gates, ups, outs = gates + shared[0], ups + shared[1], outs + shared[2]
            in_starts, in_ns = in_starts + [first] * P, ns + [count] * P
            out_starts = starts + [M + p * count for p in range(P)]
            out_ns = ns + [count] * P
        ins = gates + ups
        # (gemv_usable also checks that every one is quantized)
        if not (gemv_usable(ins, max(in_ns), x_MD) and gemv_usable(outs, max(in_ns), x_MD)):
            return None
        # Every row's gate projection (in row order), then every row's up projection.
        gu = gemv(ins, x_MD, in_starts + in_starts, in_ns + in_ns).view(2, sum(in_ns), -1)
        h = F.silu(gu[0]) * gu[1]
        if gate_M is not None:  # (the shared experts' rows after them: gate 1)
            h[:M] *= gate_M.float().unsqueeze(1)
        return gemv(outs, h, out_starts, out_ns)

    def extra_repr(self) -> str:
        m = self[0]
        return (f"experts={self.n_experts}, hidden={m.gate_proj.in_features}, "
                f"intermediate={m.gate_proj.out_features}, per-expert tensors")
