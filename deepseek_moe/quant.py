"""Weight-only quantization: int8 per output channel, int4 in groups along the input.

``deepseek-moe quantize CKPT OUT --bits 8|4`` converts a checkpoint tensor by tensor
(``quantize_checkpoint``): every linear weight of the decoder (attention projections, dense and
shared FFNs, every routed expert) becomes integers plus bf16 scales, and the output head int8
(``bits_for``); embeddings, the router's centroids and the norms stay bf16. ``config.json`` records the scheme under
``quantization_config``, and ``checkpoint.load_pretrained`` builds ``QuantLinear`` modules for it.

Stored tensors, for a weight ``W`` [N, K] named ``X.weight``:

- int8: ``X.weight`` int8 [N, K] and ``X.weight_scale`` bf16 [N]; W ~ q * scale (symmetric).
- int4: ``X.weight_packed`` uint8 [N, K/2] (element 2j in the low nibble of byte j, 2j+1 in the
  high one), ``X.weight_scale`` and ``X.weight_zero`` bf16 [N, K/G] for groups of G inputs;
  W ~ q * scale + zero with q in [0, 15] (asymmetric, the group's minimum as zero). G is the
  configured group size, or the largest smaller one that divides K (``group_for``); the stored
  scales' shape says which.

Products of a few rows (decoding: one row per token) use this package's kernel
(``deepseek_moe.kernels.quant_gemv``: int8 activations per block of 32, integer dot products,
every weight read once per call) where it is available (x86-64 with AVX2 and FMA): a mixture of
experts hands it all of a few tokens' experts in two calls, its shared experts among them as
expert-wide pieces (``QuantLinear.pieces``, ``moe.experts.ExpertList``; one token: one
operation), layers that share an input (query, key and value; gate and up) go in one call
(``fused_linears``), and a single layer takes it for its few rows (``GEMV_SINGLE_ROWS``).

On a processor with AVX512-VNNI, a layer given ``INT_GEMM_ROWS[bits]`` rows or more (prefill)
takes this package's integer GEMM (``kernels.quant_gemm_int8`` / ``quant_gemm_int4``: int8
activations per group of ``GEMM_GROUP`` inputs, vpdpbusd, 1.3-1.6x the bf16 GEMM's speed there and
no dequantized copy). Elsewhere what happens past the few rows depends on the CPU's bf16 GEMM
(``runtime.fastest_cpu_dtype``, measured once):

- Where bf16 is the faster (AMX, AVX512-BF16), an int4 layer takes this package's kernel for up
  to ``GEMV_SINGLE_ROWS[4]`` rows, and an int8 one torch's CPU kernel for weight-only int8
  (``_weight_int8pack_mm``; ``_weight_int4pack_mm_for_cpu`` serves int4 only where this package's
  kernel cannot) with bf16 activations, whose cost grows with the rows; past a number of rows
  measured on such a machine (2 cores; the dequantization costs about 0.5 ms at 1408 x 2048 for
  int8, and for int4 with the package's one-pass kernel, 3.8 ms without it; a row of torch's int4
  kernel about 60 us there, so that the GEMM wins from 20-48 rows by shape), the weight is
  dequantized to bf16 and multiplied as a dense GEMM instead.
- Where it is not (AVX2 alone: a bf16 GEMM there runs at a few GFLOP/s, and torch's two kernels
  are slower than this package's at every row count), a layer takes this package's kernel for up
  to ``GEMV_SINGLE_ROWS_FP32`` rows and otherwise dequantizes its weight to fp32 for an fp32 GEMM.

Prefill of the dense and shared layers (all the tokens) takes the GEMM.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import fastest_cpu_dtype

QUANT_METHOD = "deepseek_moe_weight_only"
BITS = (8, 4)
DEFAULT_GROUP_SIZE = 128
GROUP_SIZES = (256, 128, 64, 32)  # what the CPU int4 kernel takes, largest first
INT4_OUT_MULTIPLE = 16  # the int4 kernel's packing needs N divisible by 16
ALIGN = 64  # bytes; torch allocates so, and quantize aligns the weights in its files
INT8_KERNEL_ROWS = 40  # fewer rows: the int8 kernel; more: dequantize and a bf16 GEMM
INT4_KERNEL_ROWS = 32
GEMM_ROWS = 32  # the dequantized GEMM's rows are padded to a multiple of this
GEMV_ROWS = 8  # at most this many rows per expert: the routed experts take this package's kernel
# A single int8 layer takes it for at most 4 rows (1408 x 2048, 2 threads: 1.2-1.6x torch's int8
# kernel for 1-4 rows, even at 8). A single int4 layer takes it for up to 48 rows: torch's int4
# kernel reads its own copy of the weight, converted the first time a layer meets it and kept (in
# prefill every expert given few rows: a second copy of those experts, and its conversion in the
# time of each prompt that routes rows to new experts: a 512-token prompt of the 16B, int4, took
# 14 s new and 8.5 s repeated); on an AVX512-VNNI machine (AMD EPYC, 2 cores) this package's
# kernel is also 2x faster than torch's at 1-4 rows, 1.5x at 16-24, and faster than the
# dequantized GEMM up to 48 rows (1.1 against 1.3 ms); on an AMX machine torch's was 1.04-1.4x
# faster for one weight alone.
GEMV_SINGLE_ROWS = {8: 4, 4: 48}  # bits -> most rows of a single layer that take this package's kernel
# Where the CPU has no fast bf16 GEMM (AVX2 without AVX512-BF16 or AMX; ``fastest_cpu_dtype``),
# torch's two kernels are slower than this package's at every row count (1408 x 2048, 2 threads,
# AVX2: int8 1.2-1.5x, int4 1.7-2x, 1-64 rows), which beats dequantizing to fp32 and an fp32 GEMM
# up to about 32 rows (int8; int4 up to about 64); more rows take that GEMM.
GEMV_SINGLE_ROWS_FP32 = 32
# On a processor with AVX512-VNNI, a layer given this many rows or more (by bits) takes this
# package's integer GEMM (``kernels.quant_gemm_int8`` / ``quant_gemm_int4``); fewer, its few-row
# kernel. ``benchmarks/quant_gemm.py``, AMD EPYC (Zen 4), 2 cores, the 16B's three shapes: int4, the
# GEMM 0.7-0.9x the few-row kernel at 4 rows, 0.9-1.4x at 6, 1.06-1.17x at 8, 1.9-2.5x at 48; int8,
# 1.1-1.2x the few-row kernel and 1.2-1.3x torch's int8 kernel at 2 rows, 3.3-3.8x torch's from 48;
# from 48 rows 1.6-2.1x dequantizing to bf16 for the bf16 GEMM, 1.3-1.6x that GEMM alone (557-607
# GOP/s at 512 rows).
INT_GEMM_ROWS = {8: 2, 4: 8}
# Its activations are quantized per row and group of this many inputs (1408 x 2048, activations
# with a few large channels: 1.5% of the product's norm against 2.0-2.1% with groups of 128, in
# about the same time; the few-row kernel's blocks of 32: 1.1%).
GEMM_GROUP = 64
FUSED_ROWS = 4  # at most this many rows: layers sharing an input take the kernel together
_ROUTER = "mlp.gate.weight"


def bits_for(name: str, shape: tuple[int, ...], bits: int, tied: bool = False) -> Optional[int]:
    """The bits the checkpoint tensor ``name`` is stored in under a ``bits`` scheme (None: it
    stays bf16). The 2-D weights of the decoder's linear layers get ``bits``, except that int4
    needs shapes the CPU kernel takes (inputs in groups of 32, outputs a multiple of 16; the tiny
    presets' 88-wide experts are not), which fall back to int8. The output head is int8 in both
    schemes (unless tied to the embeddings); embeddings, the router's centroids and norms stay
    bf16."""
    if len(shape) != 2:
        return None
    if name == "lm_head.weight":
        return None if tied else 8
    if not (name.endswith("_proj.weight") and ".layers." in name) or name.endswith(_ROUTER):
        return None
    if bits == 4 and (shape[1] % GROUP_SIZES[-1] or shape[0] % INT4_OUT_MULTIPLE):
        return 8
    return bits


def quantized_shapes(shape: tuple[int, ...], bits: int, group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The stored tensors of one quantized weight: suffix (replacing ``weight``) -> (shape, dtype)."""
    N, K = shape
    if bits == 8:
        return {"weight": ((N, K), torch.int8), "weight_scale": ((N,), torch.bfloat16)}
    return {"weight_packed": ((N, K // 2), torch.uint8), "weight_scale": ((N, K // group_size), torch.bfloat16),
            "weight_zero": ((N, K // group_size), torch.bfloat16)}


def check_scheme(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise ValueError(f"the int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")


def group_for(in_features: int, group_size: int, name: str = "") -> int:
    """The int4 group of a weight with ``in_features`` inputs: ``group_size``, or the largest
    smaller one that divides them (the 16B's dense FFN has 10944 inputs: groups of 64)."""
    for g in GROUP_SIZES:
        if g <= group_size and in_features % g == 0:
            return g
    raise ValueError(f"{name or 'a weight'}: {in_features} inputs do not split into int4 groups of "
                     f"{', '.join(map(str, GROUP_SIZES))}")


def quantize_weight(w: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """``w`` [N, K] -> its stored tensors (see the module docstring), computed in fp32."""
    w = w.detach().float()
    N, K = w.shape
    if bits == 8:
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return {"weight": q, "weight_scale": scale.to(torch.bfloat16)}
    if K % group_size:
        raise ValueError(f"{K} inputs do not split into groups of {group_size}")
    g = w.view(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    # Quantize against the scale and zero as stored (bf16), so that dequantization is exact.
    scale_b, zero_b = scale.to(torch.bfloat16), lo.to(torch.bfloat16)
    q = torch.round((g - zero_b.float()[..., None]) / scale_b.float()[..., None]).clamp(0, 15)
    q = q.to(torch.uint8).view(N, K)
    return {"weight_packed": q[:, 0::2] | (q[:, 1::2] << 4), "weight_scale": scale_b, "weight_zero": zero_b}


def dequantize(t: dict[str, torch.Tensor], bits: int, group_size: int,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight the stored tensors ``t`` stand for, in ``dtype``. On the CPU, bf16 or fp32 take
    the package's one-pass kernels where they are available: int8 the same numbers as the
    operations below, int4 ``q * scale + zero`` rounded once (the operations below round the
    product and the sum each to bf16: the two differ by a rounding now and then). Prefill's
    GEMMs wait on this."""
    one_pass = dtype in (torch.bfloat16, torch.float32) and t["weight_scale"].device.type == "cpu"
    if one_pass:
        from . import kernels

        one_pass = kernels.available()
    if bits == 8:
        if one_pass:  # (the same numbers as the two operations below, in one pass)
            return kernels.dequant_int8(t["weight"].contiguous(), t["weight_scale"].contiguous(), dtype)
        return t["weight"].to(dtype) * t["weight_scale"].to(dtype)[:, None]
    packed = t["weight_packed"]
    if one_pass:
        return kernels.dequant_int4(packed.contiguous(), t["weight_scale"].contiguous(),
                                    t["weight_zero"].contiguous(), group_size, dtype)
    N = packed.shape[0]
    q = torch.stack([packed & 15, packed >> 4], -1).view(N, -1, group_size).to(dtype)
    return (q * t["weight_scale"].to(dtype)[..., None] + t["weight_zero"].to(dtype)[..., None]).view(N, -1)


_generation = [0]


def storage_generation() -> int:
    """A number that changes whenever any ``QuantLinear``'s stored tensors may have changed (a
    buffer assigned or registered, the module converted or moved), for tables of them kept between
    calls (``ExpertList.expert_table``)."""
    return _generation[0]


def _int_gemm() -> bool:
    """Whether many-row products take this package's integer GEMM (``kernels.quant_gemm_int8`` and
    ``quant_gemm_int4``: AVX512-VNNI)."""
    from . import kernels

    return kernels.gemm_available()


class QuantLinear(nn.Module):
    """A bias-free linear layer with weight-only quantized weights (int8 or int4); computes in
    bf16 whatever the input dtype and returns bf16. Inference only (no gradient)."""

    def __init__(self, in_features: int, out_features: int, bits: int,
                 group_size: int = DEFAULT_GROUP_SIZE, device: Optional[torch.device] = None):
        super().__init__()
        check_scheme(bits, 128 if bits == 8 else group_size)
        if bits == 4 and in_features % group_size:
            raise ValueError(f"{in_features} inputs do not split into groups of {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        for suffix, (shape, dtype) in quantized_shapes((out_features, in_features), bits, group_size).items():
            self.register_buffer(suffix, torch.zeros(shape, dtype=dtype, device=device))
        self._kernel_weight: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # int4: built on first use
        self._pieces: dict[tuple[int, int], tuple[torch.Tensor, list[WeightPiece]]] = {}
        # (bits, group size, inputs, outputs): what ``gemv_usable`` compares (an attribute, not a
        # property: a decoded token asks hundreds of layers)
        self.scheme = (bits, group_size, in_features, out_features)
        # whether the integer GEMM takes this shape (its activations in groups of GEMM_GROUP inputs)
        self._gemm = in_features % GEMM_GROUP == 0 and (bits == 8 or group_size % GEMM_GROUP == 0)

    def stored(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.named_buffers(recurse=False)}

    def register_buffer(self, name: str, tensor: Optional[torch.Tensor], persistent: bool = True) -> None:
        # (nn.Module assigns a buffer attribute through this too)
        _generation[0] += 1
        super().register_buffer(name, tensor, persistent)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        _generation[0] += 1
        return super()._apply(fn, recurse)

    def pieces(self, parts: int, dim: int) -> Optional[list["WeightPiece"]]:
        """The weight cut into ``parts`` equal pieces along its outputs (``dim`` 0) or its inputs
        (``dim`` 1), as views of the stored tensors (no copy) that ``gemv`` takes like layers of
        that shape; None where a piece would not be whole (outputs that do not divide; inputs
        that do not split into whole int4 groups, or blocks of 32). Kept for the next call while
        the stored tensors are the same (a weight loaded in place stays the same tensor)."""
        stored = self._buffers["weight" if self.bits == 8 else "weight_packed"]
        kept = self._pieces.get((parts, dim))
        if kept is not None and kept[0] is stored:
            return kept[1]
        N, K = self.out_features, self.in_features
        size = (N if dim == 0 else K) // parts
        if parts <= 0 or size * parts != (N if dim == 0 else K) or (dim == 1 and size % (
                self.group_size if self.bits == 4 else 32)):
            return None
        views = []
        for p in range(parts):
            piece = {}
            for name, t in self.stored().items():
                if dim == 0:
                    piece[name] = t[p * size:(p + 1) * size]
                elif name == "weight_scale" and self.bits == 8:  # per output channel: whole
                    piece[name] = t
                else:  # inputs: int8 bytes, int4 packed bytes (two per byte), or int4 groups
                    per = {"weight": 1, "weight_packed": 2}.get(name, self.group_size)
                    piece[name] = t[:, p * size // per:(p + 1) * size // per]
            views.append(WeightPiece(piece, self.bits, self.group_size, *((K, size) if dim == 0 else (size, N))))
        self._pieces[(parts, dim)] = (stored, views)
        return views

    def _int8_kernel_weight(self) -> torch.Tensor:
        """The int8 weight where the kernel can read it: it needs 16-byte aligned rows (it crashes
        on others: rows of a multiple of 16 inputs only, other shapes take the GEMM path), which a
        weight memory-mapped from a file need not be; such a one is copied once. ``quantize``
        writes its files so that their int8 weights are aligned."""
        if self.weight.data_ptr() % ALIGN:
            if self._kernel_weight is None:
                self._kernel_weight = (self.weight.clone(), self.weight_scale)
            return self._kernel_weight[0]
        return self.weight

    def _int4_kernel_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed weight and scales-and-zeros of ``_weight_int4pack_mm_for_cpu`` (which takes
        w = (q - 8) * scale + zero'), converted once."""
        if self._kernel_weight is None:
            p = self.weight_packed
            q = torch.stack([p & 15, p >> 4], -1).view(self.out_features, self.in_features).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
            scale, zero = self.weight_scale.float(), self.weight_zero.float()
            sz = torch.stack([scale.t(), (zero + 8 * scale).t()], -1).contiguous().to(torch.bfloat16)
            self._kernel_weight = (packed, sz)
        return self._kernel_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        rows = x2.shape[0]
        cpu = x2.device.type == "cpu"
        fp32_gemm = cpu and fastest_cpu_dtype() == torch.float32
        single_rows = GEMV_SINGLE_ROWS_FP32 if fp32_gemm else GEMV_SINGLE_ROWS[self.bits]
        int_gemm = self._gemm and cpu and _int_gemm()
        if int_gemm:
            single_rows = INT_GEMM_ROWS[self.bits] - 1
        if rows <= single_rows and gemv_usable([self], rows, x2, most_rows=single_rows):
            y = gemv([self], x2, [0], [rows]).to(torch.bfloat16)
        elif int_gemm:
            from . import kernels

            b = self._buffers
            y = (kernels.quant_gemm_int8(x2, b["weight"], b["weight_scale"], GEMM_GROUP) if self.bits == 8 else
                 kernels.quant_gemm_int4(x2, b["weight_packed"], b["weight_scale"], b["weight_zero"],
                                         self.group_size, GEMM_GROUP))
            y = y.to(torch.bfloat16)
        elif fp32_gemm:
            # No fast bf16 GEMM on this CPU (several times slower than fp32): dequantize to fp32.
            w = dequantize(self.stored(), self.bits, self.group_size, torch.float32)
            y = F.linear(x2.float(), w).to(torch.bfloat16)
        elif cpu and self.bits == 8 and rows < INT8_KERNEL_ROWS and self.in_features % 16 == 0:
            y = torch.ops.aten._weight_int8pack_mm(x2, self._int8_kernel_weight(), self.weight_scale)
        elif cpu and self.bits == 4 and rows < INT4_KERNEL_ROWS:
            packed, sz = self._int4_kernel_weight()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, self.group_size, sz)
        else:
            # Rows padded to a multiple of GEMM_ROWS: oneDNN prepares a bf16 GEMM per shape (1-2
            # ms the first time, measured), and prefill gives each expert its own number of rows.
            pad = -rows % GEMM_ROWS
            w = dequantize(self.stored(), self.bits, self.group_size)
            y = F.linear(F.pad(x2, (0, 0, 0, pad)), w)[:rows] if pad else F.linear(x2, w)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}{g}"


class WeightPiece:
    """Part of a ``QuantLinear``'s weight (``QuantLinear.pieces``), as ``gemv`` and
    ``gemv_usable`` take a layer: the stored tensors' views and the scheme."""

    __slots__ = ("_buffers", "bits", "group_size", "scheme")

    def __init__(self, buffers: dict[str, torch.Tensor], bits: int, group_size: int, in_features: int,
                 out_features: int):
        self._buffers, self.bits, self.group_size = buffers, bits, group_size
        self.scheme = (bits, group_size, in_features, out_features)


def gemv_usable(layers: list[QuantLinear], rows_per_layer: int, x: torch.Tensor,
                most_rows: int = GEMV_ROWS) -> bool:
    """Whether ``gemv`` serves these layers (one scheme and shape, on the CPU) for this many rows
    each (at most ``most_rows``): the package's kernel is available and takes their shape (inputs
    a multiple of 32; int4 groups a multiple of 64)."""
    scheme = getattr(layers[0], "scheme", None)  # QuantLinear's (bits, group, in, out)
    if scheme is None or x.device.type != "cpu" or rows_per_layer > most_rows or scheme[2] % 32:
        return False
    if scheme[0] == 4 and scheme[1] % 64:
        return False
    for m in layers:  # (a loop: a decoded token asks this of hundreds of layers)
        if getattr(m, "scheme", None) != scheme:  # also: every one quantized
            return False
    from . import kernels

    return kernels.available()


def gemv(layers: "Sequence[QuantLinear | WeightPiece]", x: torch.Tensor, starts: list[int], counts: list[int]) -> torch.Tensor:
    """``layers[i]`` applied to the rows ``x[starts[i] : starts[i] + counts[i]]``, in one call of
    the package's kernel: fp32 [sum(counts), out_features], the layers' results in their order.
    Check ``gemv_usable`` first."""
    from . import kernels

    first = layers[0]
    return kernels.quant_gemv(x, *kernel_args(layers), starts, counts, first.bits, first.group_size)


def kernel_args(layers: "Sequence[QuantLinear | WeightPiece]") -> tuple[list, list, list]:
    """The stored tensors of layers of one scheme as the package's kernel takes them: weights,
    scales, and (int4) zeros. Straight from each module's dict (a decoded token makes hundreds of
    these lookups; nn.Module's attribute fallback costs several times more)."""
    buffers = [m._buffers for m in layers]
    if layers[0].bits == 8:
        return [b["weight"] for b in buffers], [b["weight_scale"] for b in buffers], []
    return ([b["weight_packed"] for b in buffers], [b["weight_scale"] for b in buffers],
            [b["weight_zero"] for b in buffers])


def fused_linears(layers: Sequence[nn.Module], x: torch.Tensor, fp32: bool = False) -> Optional[torch.Tensor]:
    """Several quantized layers of one shape applied to the same input ``x`` [..., in] in one
    call of the package's kernel (the attention's query, key and value projections; an FFN's gate
    and up projections): each layer reads its weight once, and the call's fixed cost is paid
    once. Their results stacked, ``[len(layers), ..., out]``, bf16 as ``QuantLinear`` returns
    them (``fp32``: the kernel's fp32, for a caller that rounds them itself); None where the
    kernel does not serve (unquantized or mismatched layers, more rows than ``FUSED_ROWS``, no
    kernel)."""
    quantized = [m for m in layers if isinstance(m, QuantLinear)]
    if len(quantized) < len(layers) or torch.is_grad_enabled():
        return None
    first = quantized[0]
    x2 = x.reshape(-1, first.in_features)
    rows = x2.shape[0]
    if rows == 0 or rows > FUSED_ROWS or not gemv_usable(quantized, rows, x2):
        return None
    y = gemv(quantized, x2, [0] * len(quantized), [rows] * len(quantized))
    return (y if fp32 else y.to(torch.bfloat16)).view(len(quantized), *x.shape[:-1], first.out_features)


def quantized_layers(model: nn.Module) -> list["QuantLinear"]:
    """The model's quantized linear layers (none for an unquantized model)."""
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


def quantize_modules(model: nn.Module, bits: int, group_size: int) -> None:
    """Replace every linear layer of ``model`` that ``bits_for`` quantizes by a ``QuantLinear`` of
    the same shape (int4 groups: ``group_for``), on the same device (meta stays meta; values are
    zeros: load the stored tensors afterwards). Its norms and routers then decode through the
    package's kernels (``RMSNorm.use_kernel``, ``TopKRouter.use_kernel``)."""
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    targets = [(name, m, b) for name, m in model.named_modules() if isinstance(m, nn.Linear)
               for b in [bits_for(name + ".weight", tuple(m.weight.shape), bits, tied)] if b is not None]
    for name, m, b in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        g = group_for(m.in_features, group_size, name) if b == 4 else group_size
        setattr(parent, child, QuantLinear(m.in_features, m.out_features, b, g, device=m.weight.device))
    from .model import RMSNorm  # (model imports this module)
    from .moe.router import TopKRouter

    for m in model.modules():  # its norms and routers decode through the package's kernels
        if isinstance(m, (RMSNorm, TopKRouter)):
            m.use_kernel = True


def scheme_of(hf_config: dict) -> Optional[tuple[int, int]]:
    """(bits, group_size) a ``config.json`` records, None for an unquantized checkpoint."""
    q = hf_config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"unsupported quantization_config {q!r}: this project reads its own "
                         f"({QUANT_METHOD!r}, written by `deepseek-moe quantize`)")
    bits, group = q.get("bits"), q.get("group_size") or DEFAULT_GROUP_SIZE
    check_scheme(bits, group)
    return bits, group


def scheme_config(bits: int, group_size: int) -> dict:
    return {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size if bits == 4 else None,
            "modules": "decoder linear layers (attention, dense and shared FFNs, routed experts); "
                       "int8 for the output head and for shapes int4's kernel does not take"}


def stored_bytes(shape: tuple[int, ...], bits: int, group_size: int) -> int:
    return sum(math.prod(s) * dt.itemsize for s, dt in quantized_shapes(shape, bits, group_size).values())
