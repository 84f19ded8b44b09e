"""Compiled CPU kernels of this package, built on first use with the system's C++ compiler.

``quant_gemv`` (``quant_gemv.cpp``): the few-row product of weight-only quantized weights that
decoding spends its time in, for many weights in one call (see the source for the arithmetic),
and built on it one token's experts (``experts_one_token``), one new token's attention block
(``attention_block``) and mixture-of-experts block (``moe_block``, with the experts' tensors held
by the library: ``expert_table``); ``quant_gemm_int8`` and ``quant_gemm_int4``
(``quant_gemm.cpp``, AVX512-VNNI): many rows by a quantized weight in integer arithmetic, for
prefill; ``dequant_int4`` and ``dequant_int8``: a weight to bf16 or fp32 in one pass, for
prefill's GEMMs elsewhere; ``grouped_swiglu`` (``grouped_swiglu.cpp``): the routed experts of a
training step, one expert per thread, the routing's top-k selection, entropy and sort by expert
(``topk_indices``, ``routing_entropy``, ``sort_by_expert``), a few tokens' routing for inference
(``route_tokens``), and one new token's attention over the cache in bf16 (``decode_attention``).
The library is compiled (``grouped_swiglu.cpp`` for this processor, ``-march=native``) once per
source, torch version, compiler and processor into
``$DEEPSEEK_MOE_CACHE/kernels`` (default ``~/.cache/deepseek_moe/kernels``), about 30 s, and loaded
with ``torch.ops.load_library``. Where it cannot be (no compiler, another processor than x86-64
with AVX2 and FMA, or ``DEEPSEEK_MOE_KERNELS=0``), ``available()`` is False and callers use torch's
own kernels; the reason is logged once. ``DEEPSEEK_MOE_AVX2_ONLY=1`` keeps to the AVX2 kernels
on a processor with AVX-512 (no integer GEMM), to compare the two. ``grouped_swiglu.cpp`` is plain C++ (with AVX2 where the
processor has it) and needs only the library (``library_reason()``; ``cpu_routing_kernels(x)`` says whether a tensor's routing takes it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(n) for n in ("quant_gemv.cpp", "quant_gemm.cpp", "grouped_swiglu.cpp")]
_state: dict[str, object] = {}


def cache_dir() -> Path:
    root = os.environ.get("DEEPSEEK_MOE_CACHE") or os.path.join(Path.home(), ".cache", "deepseek_moe")
    return Path(root) / "kernels"


def _compiler() -> str:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"


# Sources compiled for the processor they run on (-march=native; the library's name includes the
# processor, _cpu_identity): the training experts' element-wise passes run 1.5-2x faster built so
# than as clones for generic AVX-512/AVX2. The decoding kernel keeps its per-function targets.
_NATIVE = {"grouped_swiglu.cpp"}


def _compile_commands(srcs: list[Path], out: Path) -> tuple[list[list[str]], list[Path]]:
    """One command per source (an object file beside ``out``), then the link into ``out``; and the
    object files, which the build removes."""
    import sysconfig

    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # -fno-trapping-math: floating-point comparisons may become selects, so that loops with them
    # vectorise (nothing here enables floating-point traps).
    flags = [_compiler(), "-O3", "-std=c++17", "-fPIC", "-fopenmp", "-fno-trapping-math",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    flags += [f"-I{p}" for p in cpp_extension.include_paths()]
    flags += [f"-I{sysconfig.get_paths()['include']}"]
    objs = [out.with_name(f"{out.stem}.{src.stem}.o") for src in srcs]
    cmds = [[*flags, *(["-march=native"] if src.name in _NATIVE else []), "-c", str(src), "-o", str(obj)]
            for src, obj in zip(srcs, objs)]
    link = [_compiler(), "-shared", "-fopenmp", *map(str, objs), "-o", str(out)]
    link += [f"-L{p}" for p in cpp_extension.library_paths()]
    link += [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]
    link += ["-lc10", "-ltorch_cpu", "-ltorch"]
    return [*cmds, link], objs


def _cpu_identity() -> str:
    """The processor's model and features (Linux: the first processor of /proc/cpuinfo), so that a
    cache folder shared by different machines keeps one library per processor."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().split("\n\n")[0]
        return "\n".join(line for line in info.splitlines() if line.startswith(("model name", "flags")))
    except OSError:
        return platform.processor()


def _library_path() -> Path:
    key = b"".join([*(p.read_bytes() for p in _SOURCES), torch.__version__.encode(), _compiler().encode(),
                    sys.version.encode(), _cpu_identity().encode()])
    key = hashlib.sha256(key).hexdigest()[:16]
    return cache_dir() / f"deepseek_moe-{key}.so"


def _build(lib: Path) -> None:
    """Compile into a temporary file beside ``lib`` and rename it (another process may build the
    same library at the same time; the rename makes either result whole)."""
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmds, objs = _compile_commands(_SOURCES, Path(tmp))
    try:
        for cmd in cmds:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"compiling {lib.name} failed: {(r.stderr or r.stdout).strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        for path in (tmp, *objs):
            if os.path.exists(path):
                os.unlink(path)


def library_reason() -> Optional[str]:
    """Build (once) and load the library; None when it is loaded, else why not."""
    if "library" in _state:
        return _state["library"]  # type: ignore[return-value]
    reason: Optional[str] = None
    if os.environ.get("DEEPSEEK_MOE_KERNELS", "1") == "0":
        reason = "DEEPSEEK_MOE_KERNELS=0"
    elif platform.machine().lower() not in ("x86_64", "amd64"):
        reason = f"the kernels are written for x86-64, this is {platform.machine()}"
    else:
        try:
            lib = _library_path()
            if not lib.exists():
                log.info("compiling %s (once, about 30 s) into %s", ", ".join(p.name for p in _SOURCES), lib.parent)
                _build(lib)
            torch.ops.load_library(str(lib))
        except Exception as e:  # no compiler, a failed build, a library that does not load
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    if reason is not None:
        log.info("the package's kernels are not used: %s", reason)
    _state["library"] = reason
    return reason


def load() -> Optional[str]:
    """Load the library (``library_reason``); None when ``quant_gemv`` is usable, else why not."""
    if "reason" in _state:
        return _state["reason"]  # type: ignore[return-value]
    reason = library_reason()
    if reason is None and not torch.ops.deepseek_moe.quant_gemv_supported():
        reason = "this processor lacks AVX2 and FMA"
        log.info("quantized products use torch's kernels: %s", reason)
    _state["reason"] = reason
    return reason


def available() -> bool:
    """Whether ``quant_gemv`` can be called (builds and loads the library on first call)."""
    return load() is None


def quant_gemv(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor],
               zeros: list[torch.Tensor], starts: list[int], counts: list[int], bits: int,
               group: int) -> torch.Tensor:
    """``out[o_i + r] = W_i x[starts[i] + r]`` for every weight ``i`` and ``r < counts[i]``
    (``o_i`` the sum of the earlier counts): fp32 [sum(counts), N]. See ``quant_gemv.cpp``."""
    return torch.ops.deepseek_moe.quant_gemv(x, weights, scales, zeros, starts, counts, bits, group)


def gemm_available() -> bool:
    """Whether ``quant_gemm_int8`` and ``quant_gemm_int4`` can be called: the library loads and
    the processor has AVX512-VNNI."""
    if "gemm" not in _state:
        _state["gemm"] = library_reason() is None and bool(torch.ops.deepseek_moe.quant_gemm_supported())
    return bool(_state["gemm"])


def quant_gemm_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    group: int, act_group: int = 64) -> torch.Tensor:
    """``x W^T`` fp32 [M, N] for x [M, K] (fp32 or bf16) and a weight of int4 in groups of
    ``group`` inputs (``quant`` module's layout), in integer arithmetic: the activations quantized
    to int8 per row and group of ``act_group`` inputs (a multiple of 64 that divides ``group``).
    For many rows (prefill); check ``gemm_available`` first. See ``quant_gemm.cpp``."""
    return torch.ops.deepseek_moe.quant_gemm_int4(x, packed, scale, zero, group, act_group)


def quant_gemm_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """``x W^T`` fp32 [M, N] for x [M, K] (fp32 or bf16) and a per-channel int8 weight, in integer
    arithmetic: the activations quantized to int8 per row and group of ``group`` inputs (a
    multiple of 64). Check ``gemm_available`` first. See ``quant_gemm.cpp``."""
    return torch.ops.deepseek_moe.quant_gemm_int8(x, weight, scale, group)


def expert_table(tensors: list[torch.Tensor], experts: int, pieces: int, per: int) -> object:
    """The stored tensors of a mixture-of-experts layer's experts as ``moe_block`` takes them, held
    by the library, ``per`` tensors (weight, scale; int4: and zero) each: the gate and then the up
    projections of every routed expert and then of every shared piece, then the routed experts'
    down projections and the shared experts' whole one. See ``quant_gemv.cpp``."""
    return torch.classes.deepseek_moe.ExpertTable(tensors, experts, pieces, per)


def moe_block(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, centroids: torch.Tensor, k: int, norm: bool,
              scale: float, table: object, bits: int, group: int, down_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One new token's mixture-of-experts block of a quantized bf16 model, ``x + moe(rms_norm(x))``
    for x bf16 [1, 1, D], in one operation (the steps' numbers): ``(new x, assignments per expert
    int64 [E])``. See ``quant_gemv.cpp``."""
    return torch.ops.deepseek_moe.moe_block(x, norm_weight, eps, centroids, k, norm, scale, table, bits, group,
                                            down_group)


def dequant_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                 dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The [N, K] weight of a group-wise int4 one (``quant`` module's layout) in ``dtype`` (bf16 or
    fp32): ``q * scale + zero`` in fp32 (bf16: rounded once), in one pass over the weight. See
    ``quant_gemv.cpp``."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dequant_int4 writes bf16 or fp32, not {dtype}")
    return torch.ops.deepseek_moe.dequant_int4(packed, scale, zero, group, dtype == torch.float32)


def dequant_int8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The [N, K] weight of a per-channel int8 one in ``dtype`` (bf16 or fp32): ``q * scale``
    (exact in fp32; bf16: rounded once), in one pass over the weight. See ``quant_gemv.cpp``."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dequant_int8 writes bf16 or fp32, not {dtype}")
    return torch.ops.deepseek_moe.dequant_int8(weight, scale, dtype == torch.float32)


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rms_norm(x.float()).to(x.dtype)`` (``model.RMSNorm``) as one operation, for
    inference (no gradient); x and weight both fp32 or both bf16. See ``quant_gemv.cpp``."""
    return torch.ops.deepseek_moe.rms_norm_rows(x, weight, eps)


def cpu_routing_kernels(x: torch.Tensor) -> bool:
    """Whether the routing of ``x`` takes this package's kernels: a CPU tensor, the library loaded,
    and no ``torch.compile`` tracing (a compiled model keeps torch's operations)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and library_reason() is None


def decode_attention_serves(q: torch.Tensor) -> bool:
    """Whether one new token's attention (``q`` [B, H, 1, d]) takes ``decode_attention``: bf16 on
    the CPU, no gradient, no ``torch.compile`` tracing, the library loaded. (In fp32 torch's
    attention is as fast.)"""
    return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and library_reason() is None)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one new token per row over a cache: ``softmax(scale * q k^T) v`` per head, in
    fp32 rounded once, for q [B, H, 1, d] and k, v [B, Hkv, T, d] (the cache's views; query head h
    reads key-value head h // (H / Hkv), as ``enable_gqa``). See ``grouped_swiglu.cpp``."""
    _require_library()
    return torch.ops.deepseek_moe.decode_attention(q, k, v, scale)


def decode_attention_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """One new token per row from its query, key and value projections ``qkv`` [3, B, H*d] (fp32
    or bf16) to its attention output [B, 1, H*d] bf16: rounded to bf16, query and key rotated
    (``model.apply_rope`` in bf16; ``cos``, ``sin`` bf16 [d] or [B, d] values), key and value
    written to slot ``start`` of the bf16 caches [B, H, L, d], attention over slots 0..start as
    ``decode_attention``. The numbers of those steps in one operation. See ``grouped_swiglu.cpp``."""
    _require_library()
    return torch.ops.deepseek_moe.decode_attention_rope(qkv, cos, sin, k_cache, v_cache, start, scale)


def _require_library() -> None:
    reason = library_reason()
    if reason is not None:
        raise RuntimeError(f"the package's kernels are not available: {reason}")


def grouped_swiglu(x: torch.Tensor, token_M: Optional[torch.Tensor], gate_M: Optional[torch.Tensor],
                   w1: torch.Tensor, w3: Optional[torch.Tensor], w2: torch.Tensor, counts: list[int],
                   pads: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routed experts' SwiGLU over rows sorted by expert, one expert per thread:
    ``(out, g, u)``; out is the fp32 [T, D] sum of each token's gated rows when ``token_M`` is
    given, else the rows' results [M, D]; g and u are kept for the backward. Without ``w3``,
    ``w1`` is the fused w13 [E, 2I, D] (gate rows, then up rows). See ``grouped_swiglu.cpp``."""
    _require_library()
    return torch.ops.deepseek_moe.grouped_swiglu(x, token_M, gate_M, w1, w3, w2, counts, pads)


def grouped_swiglu_backward(grad: torch.Tensor, x: torch.Tensor, token_M: Optional[torch.Tensor],
                            gate_M: Optional[torch.Tensor], w1: torch.Tensor, w3: Optional[torch.Tensor],
                            w2: torch.Tensor, g: torch.Tensor, u: torch.Tensor, counts: list[int],
                            pads: list[int], need_x: bool, need_gate: bool, need_w: bool):
    """The gradients of ``grouped_swiglu``: ``(gx, ggate, gw1, gw3, gw2)``, each None where not
    asked for (fused: gw1 is gw13, gw3 None). The weight gradients' memory comes back to the
    library when they are freed, for the next step's (``gradient_blocks_free_bytes``)."""
    _require_library()
    outs = torch.ops.deepseek_moe.grouped_swiglu_backward(grad, x, token_M, gate_M, w1, w3, w2, g, u, counts,
                                                          pads, need_x, need_gate, need_w)
    gx, ggate, gw1, gw3, gw2 = outs
    gw3 = None if w3 is None else gw3  # fused: gw1 holds both
    return (gx if need_x else None, ggate if need_gate and gate_M is not None else None,
            *(t if need_w else None for t in (gw1, gw3, gw2)))


def gradient_blocks_free_bytes() -> int:
    """Bytes of freed expert weight gradients that the library keeps for the next backward's (a
    gradient of the same size takes one instead of fresh memory). See ``grouped_swiglu.cpp``."""
    _require_library()
    return torch.ops.deepseek_moe.gradient_blocks_free_bytes()


def topk_indices(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of each row's k largest fp32 scores, largest first (a tie to the lower index,
    NaN as the largest): int64 [T, k], ``torch.topk(scores, k).indices`` without its general
    selection. See ``grouped_swiglu.cpp``."""
    _require_library()
    return torch.ops.deepseek_moe.topk_indices(scores_TE, k)


def routing_entropy(scores_TE: torch.Tensor) -> torch.Tensor:
    """The mean over rows of -sum_i s log s (nats) of fp32 scores [T, E], a score of 0 counting 0:
    ``torch.special.entr(scores).sum(-1).mean()`` in one pass. See ``grouped_swiglu.cpp``."""
    _require_library()
    return torch.ops.deepseek_moe.routing_entropy(scores_TE)


def sort_by_expert(ids_M: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(ids_M, stable=True)`` of expert ids in [0, n_experts) by counting:
    ``(sorted ids, order)``. See ``grouped_swiglu.cpp``."""
    _require_library()
    return torch.ops.deepseek_moe.sort_by_expert(ids_M, n_experts)


def experts_one_token(x: torch.Tensor, gate_up: list, gate_up_scales: list, gate_up_zeros: list, down: list,
                      down_scales: list, down_zeros: list, gates: torch.Tensor, bits: int, group: int,
                      down_group: int) -> torch.Tensor:
    """One token's experts in one operation (x [1, D]): ``gate_up`` the n experts' gate then up
    projections, ``down`` their down projections, ``gates`` fp32 [k <= n] the first k experts'
    gates (the rest: 1) -> fp32 [1, D], the gated first k's outputs summed, plus the rest's sum.
    Two ``quant_gemv`` products (int4 groups: ``group`` for gate and up, ``down_group`` for
    down) with silu(g) * u * gate between them. See ``quant_gemv.cpp``."""
    return torch.ops.deepseek_moe.experts_one_token(x, gate_up, gate_up_scales, gate_up_zeros, down, down_scales,
                                                    down_zeros, gates, bits, group, down_group)


def route_tokens(x: torch.Tensor, centroids: torch.Tensor, k: int, norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A few tokens' routing (eq. 10-11) in one operation, for inference: fp32 logits of ``x``
    [T, D] against ``centroids`` [E, D] (fp32 or bf16), softmax, the top ``k`` (largest first, a
    tie to the lower index) and their gates (``norm``: divided by their sum; times ``scale``):
    ``(ids int64 [T, k], gates fp32 [T, k])``. See ``grouped_swiglu.cpp``."""
    _require_library()
    return torch.ops.deepseek_moe.route_tokens(x, centroids, k, norm, scale)


def attention_block(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, qkv: tuple[list, list, list],
                    o: tuple[list, list, list], bits: int, group: int, o_bits: int, o_group: int, cos: torch.Tensor,
                    sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                    scale: float) -> torch.Tensor:
    """One new token's attention block of a quantized bf16 model in one operation: ``x +
    o_proj(attention(rms_norm(x)))`` for x [B, 1, D] bf16, the numbers of those steps
    (``rms_norm_rows``, ``quant_gemv`` of the ``qkv`` projections' stored tensors (weights,
    scales, zeros), ``decode_attention_rope``, ``quant_gemv`` of ``o``, the residual sum in
    bf16). See ``quant_gemv.cpp``."""
    return torch.ops.deepseek_moe.attention_block(x, norm_weight, eps, *qkv, *o, bits, group, o_bits, o_group, cos,
                                                  sin, k_cache, v_cache, start, scale)
