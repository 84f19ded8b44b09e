"""The compiled few-row quantized product (``deepseek_moe.kernels.quant_gemv``) against a readable
reference of its arithmetic, the quantized experts' fused decode path against the per-expert
loop, and the training experts' one-expert-per-thread kernel (``grouped_swiglu``; its outputs and
gradients against the reference are in test_moe's backend tests)."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from deepseek_moe import kernels
from deepseek_moe.moe.experts import ExpertList
from deepseek_moe.ffn import SwiGLU
from deepseek_moe.quant import QuantLinear, dequantize, fused_linears, gemv, gemv_usable, quantize_weight

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"no kernel here: {kernels.load()}")
BLOCK = 32  # inputs per activation scale


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 activations per block of 32 inputs (symmetric, the block's largest magnitude as 127):
    (q as float64 [M, K], scales float64 [M, K/32])."""
    M, K = x.shape
    xb = x.float().view(M, K // BLOCK, BLOCK)
    amax = xb.abs().amax(-1)
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))  # not 127 / amax: a reciprocal
    q = torch.round(xb * inv[..., None])  # to nearest, ties to even, in fp32 as the kernel
    scale = amax / 127
    return q.double().view(M, K), scale.double()


def gemv_reference(x, stored, bits, group, starts, counts):
    """The kernel's result spelt out: weight i times its rows' quantized activations, exact
    integer dot products per block, scaled by the block's scale and the weight's scales."""
    q, xs = quantize_rows_reference(x.float())
    out = []
    for t, s0, n in zip(stored, starts, counts):
        for r in range(s0, s0 + n):
            xq = q[r].view(-1, BLOCK)  # blocks
            if bits == 8:
                w = t["weight"].double().view(t["weight"].shape[0], -1, BLOCK)
                dots = (w * xq).sum(-1)  # [N, blocks], exact integers
                out.append((dots * xs[r]).sum(-1) * t["weight_scale"].double())
            else:
                p = t["weight_packed"]
                N = p.shape[0]
                wq = torch.stack([p & 15, p >> 4], -1).view(N, -1).double().view(N, -1, BLOCK)
                dots = (wq * xq).sum(-1)  # [N, blocks]
                per_group = (dots * xs[r]).view(N, -1, group // BLOCK).sum(-1)  # [N, groups]
                xsum = (xq * xs[r][:, None]).view(-1, group).sum(-1)  # the quantized inputs' sums
                scale, zero = t["weight_scale"].double(), t["weight_zero"].double()
                out.append((per_group * scale).sum(-1) + (zero * xsum).sum(-1))
    return torch.stack(out).float()


def _stored(bits, group, n_weights, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [quantize_weight(torch.randn(N, K, generator=g) * 0.02, bits, group) for _ in range(n_weights)]


def _call(x, stored, bits, group, starts, counts):
    key = "weight" if bits == 8 else "weight_packed"
    return kernels.quant_gemv(x, [t[key] for t in stored], [t["weight_scale"] for t in stored],
                              [t["weight_zero"] for t in stored] if bits == 4 else [],
                              starts, counts, bits, group)


@needs_kernel
@pytest.mark.parametrize("bits, group, K", [(8, 0, 96), (8, 0, 2080), (4, 64, 192), (4, 128, 384), (4, 256, 512),
                                           (4, 64, 1216)])  # 19 groups of 64 inputs
def test_quant_gemv_equals_its_arithmetic(bits, group, K):
    """Odd numbers of channels (tiles of 4 and a remainder), several weights, spans of 0, 1, 2 and
    3 rows (one row takes int4's channel-at-a-time path) that overlap and skip rows; fp32 and bf16
    activations; a block of zeros (scale 0)."""
    N = 37 if bits == 8 else 48
    stored = _stored(bits, group or 128, 4, N, K)
    torch.manual_seed(1)
    x = torch.randn(6, K)
    x[2, :BLOCK] = 0
    x[4] *= 50  # large activations: the scales follow
    starts, counts = [0, 1, 5, 3], [2, 1, 0, 3]
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        out = _call(xd, stored, bits, group, starts, counts)
        ref = gemv_reference(xd, stored, bits, group, starts, counts)
        assert out.shape == (sum(counts), N) and out.dtype == torch.float32
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("bits, group, K", [(8, 0, 96), (4, 64, 192), (4, 128, 384)])
@pytest.mark.parametrize("rows", [1, 2])
def test_a_weight_wider_than_the_rows_reads_consecutive_rows(bits, group, K, rows):
    """A weight of 2 or 3 times the rows' inputs takes that many consecutive rows, side by side, as
    each of its rows (the shared experts' whole down projection on their pieces' activations):
    its arithmetic on the concatenated rows, beside weights of the rows' width; one row takes
    int4's one-row loop, two the tiles. A span past the last row is refused."""
    N = 40
    narrow, wide2, wide3 = _stored(bits, group or 128, 1, N, K, 3), _stored(bits, group or 128, 1, N, 2 * K, 4), \
        _stored(bits, group or 128, 1, N, 3 * K, 5)
    torch.manual_seed(2)
    x = torch.randn(12, K)
    x[3] *= 40
    stored, starts, counts = narrow + wide2 + wide3, [0, 1, 1 + 2 * rows], [rows, rows, rows]
    out = _call(x, stored, bits, group, starts, counts)
    ref = torch.cat([gemv_reference(x[s:s + n * c].reshape(n, c * K), [t], bits, group, [0], [n])
                     for t, s, n, c in zip(stored, starts, counts, (1, 2, 3))])
    assert out.shape == (sum(counts), N)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    with pytest.raises(RuntimeError, match="x 3 out of the 12 rows"):
        _call(x, wide3, bits, group, [10], [1])


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_gemv_is_close_to_the_dequantized_product(bits):
    """What quantizing the activations costs: about 0.5% of the output's norm for Gaussian inputs
    (int8 per block of 32), the same for both weight schemes."""
    stored = _stored(bits, 128, 2, 256, 1024)
    x = torch.randn(3, 1024)
    out = _call(x, stored, bits, 128, [0, 1], [3, 2])
    ref = torch.cat([x[s:s + n] @ dequantize(t, bits, 128, torch.float32).T for t, s, n in zip(stored, [0, 1], [3, 2])])
    assert ((out - ref).norm() / ref.norm()).item() < 0.01


@needs_kernel
def test_quant_gemv_refuses_what_it_cannot_compute():
    stored = _stored(8, 128, 2, 16, 64)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="out of the 2 rows"):
        _call(x, stored, 8, 0, [0, 1], [1, 2])
    with pytest.raises(RuntimeError, match="multiple of 32"):
        _call(torch.randn(2, 48), _stored(8, 128, 1, 16, 48), 8, 0, [0], [1])
    with pytest.raises(RuntimeError, match="one scale, start and count"):
        _call(x, stored, 8, 0, [0], [1])
    with pytest.raises(RuntimeError, match="int4 group"):
        _call(x, _stored(4, 32, 1, 16, 64), 4, 32, [0], [1])


needs_gemm = pytest.mark.skipif(not kernels.gemm_available(), reason="no AVX512-VNNI integer GEMM on this processor")


def gemm_int4_reference(x: torch.Tensor, t: dict, group: int, act_group: int) -> torch.Tensor:
    """``quant_gemm_int4`` spelt out: the activations quantized to int8 per row and group of
    ``act_group`` inputs (the group's largest magnitude as 127), the product of the dequantized
    weight (groups of ``group``) with them, in float64."""
    M, K = x.shape
    xg = x.float().view(M, K // act_group, act_group)
    amax = xg.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))  # as the kernel divides
    xq = (torch.round(xg * inv).double() * (amax.double() / 127)).view(M, K)
    return (xq @ dequantize(t, 4, group, torch.float64).T).float()


@needs_gemm
@pytest.mark.parametrize("M, N, K, group, act_group", [(1, 16, 64, 64, 64), (7, 40, 256, 128, 64),
                                                       (7, 40, 256, 128, 128), (13, 96, 512, 256, 64),
                                                       (50, 33, 1216, 64, 64), (6, 64, 384, 128, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_gemm_int4_equals_its_arithmetic(M, N, K, group, act_group, dtype):
    """Row counts on both sides of the six-row tile, channels that fill panels of 32 or not, weight
    groups of 64 to 256 inputs (19 groups of 64 in one case) and activation groups of 64 or the
    weight's, fp32 and bf16 activations, a weight whose rows are a slice of a wider one's, a row of
    zeros (scale 0) and a group of one large input."""
    g = torch.Generator().manual_seed(M + N)
    t = quantize_weight(torch.randn(N, K + 256, generator=g) * 0.02, 4, group)
    sliced = {"weight_packed": t["weight_packed"][:, :K // 2], "weight_scale": t["weight_scale"][:, :K // group],
              "weight_zero": t["weight_zero"][:, :K // group]}
    x = torch.randn(M, K, generator=g)
    x[M // 2] = 0
    x[0, :group] = torch.where(torch.arange(group) == 5, 1e3, 1e-3)
    x = x.to(dtype)
    ref = gemm_int4_reference(x, {k: v.contiguous() for k, v in sliced.items()}, group, act_group)
    out = kernels.quant_gemm_int4(x, sliced["weight_packed"], sliced["weight_scale"], sliced["weight_zero"], group,
                                  act_group)
    assert out.shape == (M, N) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert out[M // 2].abs().max().item() == 0 or M == 1
    # what quantizing the activations per group costs, against the unquantized product
    plain = x.float() @ dequantize(sliced, 4, group, torch.float32).T
    assert ((out - plain).norm() / plain.norm()).item() < 0.01


@needs_gemm
@pytest.mark.parametrize("M, N, K, group", [(1, 16, 64, 64), (7, 40, 256, 128), (50, 33, 1216, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_gemm_int8_equals_its_arithmetic(M, N, K, group, dtype):
    """The int8 GEMM: the dequantized weight (weights of both signs, up to +-127) times the
    activations quantized per row and group; a weight whose rows are a slice of a wider one's, a
    row of zeros."""
    g = torch.Generator().manual_seed(M + N)
    t = quantize_weight(torch.randn(N, K + 64, generator=g) * 0.02, 8)
    weight = t["weight"][:, :K]
    x = torch.randn(M, K, generator=g)
    if M > 1:
        x[M // 2] = 0
    x = x.to(dtype)
    deq = {"weight": weight.contiguous(), "weight_scale": t["weight_scale"]}
    xg = x.float().view(M, K // group, group)
    amax = xg.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    xq = (torch.round(xg * inv).double() * (amax.double() / 127)).view(M, K)
    ref = (xq @ dequantize(deq, 8, 128, torch.float64).T).float()
    out = kernels.quant_gemm_int8(x, weight, t["weight_scale"], group)
    assert out.shape == (M, N) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    plain = x.float() @ dequantize(deq, 8, 128, torch.float32).T
    assert ((out - plain).norm() / plain.norm()).item() < 0.01


@needs_gemm
def test_quant_gemm_refuses_what_it_cannot_compute():
    t = quantize_weight(torch.randn(16, 128), 4, 64)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        kernels.quant_gemm_int4(torch.randn(2, 128), t["weight_packed"], t["weight_scale"], t["weight_zero"], 64, 32)
    with pytest.raises(RuntimeError, match="must divide the weight's"):
        kernels.quant_gemm_int4(torch.randn(2, 128), t["weight_packed"], t["weight_scale"], t["weight_zero"], 64, 128)
    with pytest.raises(RuntimeError, match="uint8"):
        kernels.quant_gemm_int4(torch.randn(2, 256), t["weight_packed"], t["weight_scale"], t["weight_zero"], 64)
    with pytest.raises(RuntimeError, match="scale and zero"):
        kernels.quant_gemm_int4(torch.randn(2, 128), t["weight_packed"], t["weight_scale"][:8], t["weight_zero"], 64)
    t8 = quantize_weight(torch.randn(16, 128), 8)
    with pytest.raises(RuntimeError, match="int8"):
        kernels.quant_gemm_int8(torch.randn(2, 128), t8["weight"].float(), t8["weight_scale"], 64)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        kernels.quant_gemm_int8(torch.randn(2, 96), t8["weight"][:, :96], t8["weight_scale"], 96)


def test_the_kernels_can_be_switched_off():
    code = ("from deepseek_moe import kernels; import sys, torch; "
            "from deepseek_moe.moe import GroupedExperts; "
            "auto = GroupedExperts(4, 8, 12).resolve_backend(torch.randn(2, 8)); "
            "sys.exit(0 if kernels.load() == 'DEEPSEEK_MOE_KERNELS=0' and not kernels.available() "
            "and kernels.library_reason() == 'DEEPSEEK_MOE_KERNELS=0' and auto == 'padded' else 1)")
    env = dict(os.environ, DEEPSEEK_MOE_KERNELS="0")
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_a_failed_build_is_the_reason_and_leaves_nothing(tmp_path):
    """A compiler that fails: the kernels are not used, the reason names the library, and the
    build's temporary library and object files are gone."""
    code = "from deepseek_moe import kernels; print(kernels.library_reason())"
    env = dict(os.environ, CXX="false", DEEPSEEK_MOE_CACHE=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("compiling deepseek_moe-") and "failed" in r.stdout
    assert list((tmp_path / "kernels").iterdir()) == []


def _quantized_experts(bits, group, n_experts=5, hidden=64, inter=128):
    torch.manual_seed(0)
    experts = ExpertList(n_experts, hidden, inter)
    for m in experts:
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(m, name)
            q = QuantLinear(lin.in_features, lin.out_features, bits, group)
            for k, v in quantize_weight(lin.weight * 10, bits, group).items():
                getattr(q, k).copy_(v)
            setattr(m, name, q)
    return experts


@needs_kernel
@pytest.mark.parametrize("bits, group", [(8, 128), (4, 64)])
def test_quantized_experts_decode_in_two_calls(bits, group):
    """ExpertList with quantized experts and a few rows each: the two fused calls equal the
    arithmetic of the kernel applied expert by expert (gate and up, SwiGLU in fp32, gate, down),
    whatever experts are idle; many rows take the per-expert path."""
    experts = _quantized_experts(bits, group)
    counts = torch.tensor([2, 0, 1, 3, 0])
    x = torch.randn(6, 64)
    gate = torch.rand(6)
    calls = []
    real = kernels.quant_gemv

    def counting(*a, **k):
        calls.append(len(a[1]))
        return real(*a, **k)

    with torch.no_grad():
        kernels.quant_gemv = counting
        try:
            y = experts(x, counts, gate)
        finally:
            kernels.quant_gemv = real
    assert calls == [6, 3]  # gate and up of the 3 busy experts, then their down projections
    expected, s = [], 0
    with torch.no_grad():
        for e, n in enumerate(counts.tolist()):
            if n:
                m, rows = experts[e], x[s:s + n]
                g = gemv([m.gate_proj], rows, [0], [n])
                u = gemv([m.up_proj], rows, [0], [n])
                h = torch.nn.functional.silu(g) * u * gate[s:s + n, None]
                expected.append(gemv([m.down_proj], h, [0], [n]))
            s += n
    assert y.dtype == torch.float32
    assert torch.allclose(y, torch.cat(expected), rtol=1e-5, atol=1e-6)
    assert not gemv_usable([experts[0].gate_proj], 9, x)  # more rows per expert: the GEMM paths


@needs_kernel
@pytest.mark.parametrize("bits, group", [(8, 128), (4, 64)])
@pytest.mark.parametrize("T", [1, 3])
def test_few_tokens_skip_the_permutation_with_the_same_result(bits, group, T):
    """A few tokens' assignments go to the quantized experts unsorted (``ExpertList.few_tokens``,
    which ``dispatch`` takes without a capacity): two kernel calls, and bit for bit the result of
    the three stages (permute, experts on the gathered rows, combine), also when tokens share
    experts; one token takes one operation (``experts_one_token``), within fp32 roundings of
    them; many tokens, or a capacity, take the stages."""
    from deepseek_moe.moe.dispatch import combine, dispatch, permute

    experts = _quantized_experts(bits, group)
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, 64, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(5, generator=g)[:3] for _ in range(T)])  # K = 3 of 5 experts
    weights = torch.rand(T, 3, generator=g)
    used = len(set(ids.flatten().tolist()))
    with torch.no_grad():
        perm = permute(ids, weights, 5)
        staged = combine(experts(x.index_select(0, perm.token_M), perm.counts_E, perm.gate_M), perm)
        with _CountingKernel() as k:
            y, dropped = dispatch(x, ids, weights, experts)
        assert k.calls == ([("one token", 2 * used, used)] if T == 1 else [2 * used, used])
        assert y.dtype == torch.float32 and int(dropped) == 0
        if T == 1:
            assert torch.allclose(y, staged, rtol=1e-5, atol=1e-6 * staged.abs().max().item())
        else:
            assert torch.equal(y, staged)
        assert experts.few_tokens(x[:1].expand(9, 64), ids[:1].expand(9, 3), weights[:1].expand(9, 3)) is None
        with _CountingKernel() as k:
            y_cap, _ = dispatch(x, ids, weights, experts, capacity=T * 3)  # nothing dropped
        assert torch.equal(y_cap, staged) and len(k.calls) == 2
        x32 = torch.randn(T, 64, generator=g)  # fp32 rows under bf16 autocast: rounded as the stages round them
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast, _ = dispatch(x32, ids, weights, experts)
            slow, _ = dispatch(x32, ids, weights, experts, capacity=T * 3)
        assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-6 * slow.abs().max().item())
    with torch.enable_grad():
        assert experts.few_tokens(x, ids, weights) is None


def _quantized_shared(bits, group, hidden=64, width=256, seed=7):
    """Shared experts two routed experts wide (``_quantized_experts``' width 128), quantized."""
    ffn = SwiGLU(hidden, width)
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(ffn, name)
        setattr(ffn, name, _quantized_linear(lin.in_features, lin.out_features, bits, group, seed + len(name)))
    return ffn


@needs_kernel
@pytest.mark.parametrize("bits, group", [(8, 128), (4, 64)])
@pytest.mark.parametrize("T", [1, 3])
def test_shared_experts_decode_in_the_routed_experts_calls(bits, group, T):
    """The shared experts, cut into expert-wide pieces (views of their weights), go into the
    routed experts' calls: the result is the routed experts' plus the shared experts' own product
    by the kernel (whole weights, SwiGLU in fp32), within fp32 roundings; no call of their own. One
    token's down projections take the shared experts' whole (both pieces' activations as its
    input row): one weight in place of two."""
    from deepseek_moe.moe.dispatch import dispatch

    experts, shared = _quantized_experts(bits, group), _quantized_shared(bits, group)
    g = torch.Generator().manual_seed(10 + T)
    x = torch.randn(T, 64, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(5, generator=g)[:3] for _ in range(T)])
    weights = torch.rand(T, 3, generator=g)
    used = len(set(ids.flatten().tolist()))
    with torch.no_grad():
        routed, _ = dispatch(x, ids, weights, experts)
        h = torch.nn.functional.silu(gemv([shared.gate_proj], x, [0], [T])) * gemv([shared.up_proj], x, [0], [T])
        want = routed + gemv([shared.down_proj], h, [0], [T])
        with _CountingKernel() as k:
            y = experts.few_tokens(x, ids, weights, shared)
        assert k.calls == ([("one token", 2 * used + 4, used + 1)] if T == 1 else [2 * used + 4, used + 2])
        assert y.dtype == torch.float32 and y.shape == (T, 64)
        assert torch.allclose(y, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        assert experts.few_tokens(x, ids, weights, _quantized_shared(bits, group, width=192)) is None  # 1.5 experts
        assert experts.few_tokens(x[:1].expand(5, 64), ids[:1].expand(5, 3), weights[:1].expand(5, 3), shared) is None


@needs_kernel
@pytest.mark.parametrize("bits, group", [(8, 128), (4, 64)])
def test_a_weight_in_pieces_computes_its_product(bits, group):
    """``QuantLinear.pieces``: by outputs, the pieces' products are the weight's rows, bit for bit;
    by inputs (slices of each row: strided views, no copy), they sum to its product; pieces that
    would not be whole are refused; the same views come back while the weight is the same."""
    lin = _quantized_linear(256, 96, bits, group, 3)
    x = torch.randn(2, 256)
    with torch.no_grad():
        whole = gemv([lin], x, [0], [2])
        rows = lin.pieces(3, 0)
        assert torch.equal(gemv(rows, x, [0] * 3, [2] * 3).view(3, 2, 32).transpose(0, 1).reshape(2, 96), whole)
        cols = lin.pieces(2, 1)
        assert all(not p._buffers["weight" if bits == 8 else "weight_packed"].is_contiguous() for p in cols)
        halves = gemv(cols, torch.cat([x[:, :128], x[:, 128:]]), [0, 2], [2, 2]).view(2, 2, 96).sum(0)
        assert torch.allclose(halves, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())
        assert lin.pieces(5, 0) is None and lin.pieces(2 if bits == 4 else 3, 1) is (None if bits == 8 else cols)
        assert lin.pieces(256 // (group if bits == 4 else 32) * 2, 1) is None
        lin.weight_scale = lin.weight_scale.clone()  # (scales: the views follow the stored weight)
        setattr(lin, "weight" if bits == 8 else "weight_packed", lin.stored()["weight" if bits == 8 else "weight_packed"].clone())
        assert lin.pieces(2, 1) is not cols


@needs_kernel
def test_one_tokens_swiglu_follows_torch():
    """The one-token operation's SwiGLU (its own e^x) against torch's silu over a wide range of
    gate values (large ones: silu(g) = g; very negative: 0), and with a NaN among the inputs."""
    experts = _quantized_experts(8, 128)
    torch.manual_seed(0)
    with torch.no_grad():
        for scale in (0.1, 10.0, 1000.0, float("nan")):
            x = (torch.randn(1, 64) * (1.0 if scale != scale else scale)).bfloat16()
            if scale != scale:
                x[0, 5] = scale
            one = experts.few_tokens(x, torch.tensor([[0, 3, 1]]), torch.tensor([[0.5, 0.25, 0.125]]))
            steps = experts(x.expand(3, 64).contiguous(), torch.tensor([1, 1, 0, 1, 0]), torch.tensor([0.5, 0.125, 0.25]))
            want = steps.sum(0, keepdim=True)
            assert torch.allclose(one, want, rtol=1e-5, atol=1e-6 * want.nan_to_num().abs().max().item(), equal_nan=True)


def _quantized_linear(in_features, out_features, bits, group, seed):
    g = torch.Generator().manual_seed(seed)
    q = QuantLinear(in_features, out_features, bits, group)
    for k, v in quantize_weight(torch.randn(out_features, in_features, generator=g) * 0.02, bits, group).items():
        getattr(q, k).copy_(v)
    return q


class _CountingKernel:
    """Replaces ``kernels.quant_gemv`` for a ``with`` block and records each call's weights."""

    def __enter__(self):
        self.calls, self.real = [], kernels.quant_gemv

        def counting(*a, **k):
            self.calls.append(len(a[1]))
            return self.real(*a, **k)

        def one_token(*a, **k):
            self.calls.append(("one token", len(a[1]), len(a[4])))
            return self.real_one(*a, **k)

        self.real_one = kernels.experts_one_token
        kernels.quant_gemv, kernels.experts_one_token = counting, one_token
        return self

    def __exit__(self, *exc):
        kernels.quant_gemv, kernels.experts_one_token = self.real, self.real_one


@needs_kernel
@pytest.mark.parametrize("bits, group", [(8, 128), (4, 64)])
def test_layers_sharing_an_input_take_one_call(bits, group):
    """The attention's q/k/v and an FFN's gate/up: one call, each result equal to its layer's own
    product by the kernel (bf16, as ``QuantLinear`` returns it), for 1-3 rows in any leading
    shape; None where the kernel does not serve."""
    layers = [_quantized_linear(128, 96, bits, group, seed) for seed in range(3)]
    for shape in ((1, 1, 128), (3, 128), (1, 2, 128)):
        x = torch.randn(shape).bfloat16()
        rows = x.numel() // 128
        with torch.no_grad(), _CountingKernel() as k:
            ys = fused_linears(layers, x)
        assert k.calls == [3]
        for m, y in zip(layers, ys):
            assert y.shape == (*shape[:-1], 96) and y.dtype == torch.bfloat16
            want = gemv([m], x.reshape(rows, 128), [0], [rows]).to(torch.bfloat16).view(*shape[:-1], 96)
            assert torch.equal(y, want)
    x = torch.randn(1, 128)
    with torch.no_grad():
        assert fused_linears(layers, torch.randn(9, 128)) is None  # many rows: a GEMM's work
        assert fused_linears(layers[:2] + [_quantized_linear(128, 64, bits, group, 5)], x) is None
        assert fused_linears(layers[:2] + [torch.nn.Linear(128, 96, bias=False)], x) is None
    assert fused_linears(layers, x) is None  # autograd on: inference only


@needs_kernel
def test_a_quantized_ffn_makes_two_calls():
    """SwiGLU with int8 weights decoding a row: gate and up in one call, down in another, with
    the result of the three layers applied one by one."""
    ffn = SwiGLU(128, 64)
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(ffn, name)
        setattr(ffn, name, _quantized_linear(lin.in_features, lin.out_features, 8, 128, len(name)))
    x = torch.randn(1, 128).bfloat16()
    with torch.no_grad(), _CountingKernel() as k:
        y = ffn(x)
    assert k.calls == [2, 1]
    with torch.no_grad():
        want = ffn.down_proj(torch.nn.functional.silu(ffn.gate_proj(x)) * ffn.up_proj(x))
    assert torch.equal(y, want)


@needs_kernel
def test_int8_dequantized_in_one_pass():
    """The one-pass int8 -> bf16 / fp32 weight equals the two tensor operations it replaces bit for
    bit (q * scale: exact in fp32, rounded once to bf16), scales of any size."""
    t = quantize_weight(torch.randn(37, 96) * torch.logspace(-4, 2, 37)[:, None], 8)
    for dtype in (torch.bfloat16, torch.float32):
        fast = kernels.dequant_int8(t["weight"], t["weight_scale"], dtype)
        ops = t["weight"].to(dtype) * t["weight_scale"].to(dtype)[:, None]
        assert fast.dtype == dtype and torch.equal(fast, ops)
        assert torch.equal(dequantize(t, 8, 128, dtype), ops)
    assert torch.equal(kernels.dequant_int8(t["weight"], t["weight_scale"], torch.float32),
                       (t["weight"].double() * t["weight_scale"].double()[:, None]).float())
    with pytest.raises(RuntimeError, match="contiguous bf16 \\[N\\]"):
        kernels.dequant_int8(t["weight"], t["weight_scale"][:5])


@needs_kernel
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_dequantized_in_one_pass(group):
    """The one-pass int4 -> bf16 weight equals q * scale + zero computed exactly and rounded once
    to bf16 (fp32: rounded once to fp32), and is within a bf16 rounding of the tensor operations' result (which round the
    product and the sum each)."""
    t = quantize_weight(torch.randn(37, 512) * 0.05, 4, group)
    fast = dequantize(t, 4, group)
    p = t["weight_packed"]
    q = torch.stack([p & 15, p >> 4], -1).view(37, -1, group).double()
    exact = (q * t["weight_scale"].double()[..., None] + t["weight_zero"].double()[..., None]).view(37, -1)
    assert fast.dtype == torch.bfloat16 and fast.shape == (37, 512)
    assert torch.equal(fast, exact.to(torch.bfloat16))
    ops = (q.bfloat16() * t["weight_scale"][..., None] + t["weight_zero"][..., None]).view(37, -1)
    terms = (q * t["weight_scale"].double()[..., None].abs() + t["weight_zero"].double()[..., None].abs()).view(37, -1)
    assert ((fast.double() - ops.double()).abs() <= 2 ** -7 * terms).all()  # a rounding of the terms apart
    fp32 = dequantize(t, 4, group, torch.float32)  # for CPUs without a fast bf16 GEMM
    assert fp32.dtype == torch.float32 and torch.equal(fp32, exact.float())  # q * scale exact: one rounding
    with pytest.raises(RuntimeError, match="must be even and divide"):
        kernels.dequant_int4(p, t["weight_scale"], t["weight_zero"], 24)


@needs_kernel
def test_decoding_with_fused_projections_equals_one_layer_at_a_time(monkeypatch):
    """A quantized model's decode step (q/k/v and gate/up each in one call, q and k rotated
    together) gives the logits of the same step with every layer called alone (int8: the same
    kernel arithmetic either way)."""
    from deepseek_moe import quant
    from deepseek_moe.model import Attention, DeepseekForCausalLM, KVCache
    from deepseek_moe.presets import get_config
    from deepseek_moe.quant import quantize_modules, quantized_layers

    torch.manual_seed(0)
    model = DeepseekForCausalLM(get_config("tiny", vocab_size=97, num_hidden_layers=2)).eval()
    quantize_modules(model, 8, 128)
    g = torch.Generator().manual_seed(0)
    for m in quantized_layers(model):
        for k, v in quantize_weight(torch.randn(m.out_features, m.in_features, generator=g) * 0.05, 8, 128).items():
            getattr(m, k).copy_(v)
    model = model.to(torch.bfloat16)
    prompt, step = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 1))

    def decode_logits():
        cache = KVCache.for_model(model, 1, 8)
        with torch.no_grad():
            model(prompt, cache=cache)
            return model(step, cache=cache).logits

    calls = []
    real = kernels.quant_gemv
    monkeypatch.setattr(kernels, "quant_gemv", lambda *a: calls.append(len(a[1])) or real(*a))
    # (the attention block in one operation, which takes them in C++, is tested below)
    monkeypatch.setattr(Attention, "decode_block", lambda *a: None)
    fused = decode_logits()
    assert 3 in calls  # q, k and v took one call
    monkeypatch.setattr(quant, "FUSED_ROWS", 0)
    calls.clear()
    alone = decode_logits()
    assert 3 not in calls and 2 not in calls
    assert torch.equal(fused, alone)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 2048), (3, 5, 64), (2, 100), (1, 7)])
def test_rms_norm_in_one_operation(dtype, shape):
    """The package's RMSNorm equals the model's formula (``w * rms_norm(x.float()).to(dtype)``):
    bf16 within one unit in the last place (the fp32 sum's order differs), fp32 within 1e-6."""
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    ref = w * torch.nn.functional.rms_norm(x.float(), (shape[-1],), eps=1e-6).to(dtype)
    out = kernels.rms_norm_rows(x, w, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    if dtype == torch.bfloat16:
        ulp = 2.0 ** (torch.frexp(ref.float()).exponent.float() - 8)
        assert ((out.float() - ref.float()).abs() <= ulp).all()
    else:
        assert torch.allclose(out, ref, rtol=1e-6, atol=1e-7)


@needs_kernel
def test_a_quantized_models_norms_decode_through_the_kernel(monkeypatch):
    """``quantize_modules`` marks the norms; a marked norm takes the kernel for a few rows without
    gradients only, and the result is close to torch's."""
    from deepseek_moe import model as model_module
    from deepseek_moe.config import DeepseekMoEConfig
    from deepseek_moe.model import DeepseekForCausalLM, RMSNorm
    from deepseek_moe.quant import quantize_modules

    m = DeepseekForCausalLM(DeepseekMoEConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                              moe_intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=2,
                                              n_routed_experts=4, num_experts_per_tok=2))
    norms = [n for n in m.modules() if isinstance(n, RMSNorm)]
    assert not any(n.use_kernel for n in norms)
    quantize_modules(m, 8, 128)
    assert all(n.use_kernel for n in norms)
    calls = []
    real = kernels.rms_norm_rows
    monkeypatch.setattr(kernels, "rms_norm_rows", lambda *a: calls.append(a[0].shape) or real(*a))
    norm = norms[0]
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        y = norm(x)
        assert len(calls) == 1
        norm(torch.randn(1, model_module.NORM_KERNEL_ROWS + 1, 64))
        assert len(calls) == 1  # many rows: torch's
    assert torch.allclose(y, norm.weight * torch.nn.functional.rms_norm(x, (64,), eps=norm.eps), rtol=1e-6, atol=1e-7)
    norm(x)  # gradients on: torch's
    assert len(calls) == 1


needs_library = pytest.mark.skipif(kernels.library_reason() is not None,
                                   reason=f"no kernel library here: {kernels.library_reason()}")


def _grouped_inputs(dtype, T=37, D=24, I=20, E=6, K=3):
    from deepseek_moe.moe import permute

    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[:, 0] = torch.where(ids[:, 0] == E - 1, 0, ids[:, 0])  # expert E-1 gets fewer rows
    perm = permute(ids, torch.rand(T, K, generator=g), E)
    ws = [(torch.randn(*shape, generator=g) * 0.3).to(dtype) for shape in ((E, I, D), (E, I, D), (E, D, I))]
    counts = perm.counts_E.tolist()
    return x, perm, ws, counts


def _fused(ws):
    """(w1, w3, w2) -> (w13, None, w2): the kernel's fused form, each expert's gate rows then up rows."""
    return torch.cat(ws[:2], 1), None, ws[2]


@needs_library
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_swiglu_is_the_same_on_any_number_of_threads(dtype, fused):
    """Each expert is computed whole by one thread and each token's rows are summed in row order,
    so one thread and two give the same bits, outputs and every gradient (padded rows too)."""
    x, perm, ws, counts = _grouped_inputs(dtype)
    ws = _fused(ws) if fused else ws
    pads = [n + (n % 3) for n in counts]  # some experts padded with zero rows
    grad = torch.randn(x.shape)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, g, u = kernels.grouped_swiglu(x, perm.token_M, perm.gate_M, *ws, counts, pads)
            back = kernels.grouped_swiglu_backward(grad, x, perm.token_M, perm.gate_M, *ws, g, u, counts, pads,
                                                   True, True, True)
            results.append([out, g, u, *back])
    finally:
        torch.set_num_threads(threads)
    assert results[0][0].dtype == torch.float32 and results[0][3].dtype == dtype  # fp32 sum, gx as x
    for i, (a, b) in enumerate(zip(*results)):
        if fused and i == 6:
            assert a is None and b is None  # fused: gw1 is gw13, no gw3
        else:
            assert torch.equal(a, b)
    unpadded = kernels.grouped_swiglu(x, perm.token_M, perm.gate_M, *ws, counts, counts)[0]
    torch.testing.assert_close(unpadded, results[0][0], rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)


@needs_library
@pytest.mark.parametrize("token", [True, False])
def test_grouped_swiglu_fused_gate_up_equals_separate(token):
    """w1 and w3 fused into one [E, 2I, D] tensor (one GEMM for both up projections, one for their
    input gradient, one for their weight gradient): the same results as the separate weights,
    routed (with the combine) and as the plain stage."""
    x, perm, ws, counts = _grouped_inputs(torch.float32)
    tok = perm.token_M if token else None
    if not token:
        x = x.index_select(0, perm.token_M)
    pads = [n + (n % 3) for n in counts]
    grad = torch.randn(x.shape if token else (sum(counts), x.shape[1]))
    out, g, u = kernels.grouped_swiglu(x, tok, perm.gate_M, *ws, counts, pads)
    out_f, gu, u_f = kernels.grouped_swiglu(x, tok, perm.gate_M, *_fused(ws), counts, pads)
    I = ws[0].shape[1]
    assert gu.shape == (sum(pads), 2 * I) and u_f.numel() == 0
    torch.testing.assert_close(out_f, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gu, torch.cat([g, u], 1), rtol=1e-5, atol=1e-5)
    gx, ggate, gw1, gw3, gw2 = kernels.grouped_swiglu_backward(grad, x, tok, perm.gate_M, *ws, g, u, counts, pads,
                                                               True, True, True)
    gx_f, ggate_f, gw13, none, gw2_f = kernels.grouped_swiglu_backward(
        grad, x, tok, perm.gate_M, *_fused(ws), gu, u_f, counts, pads, True, True, True)
    assert none is None
    for fused, separate in ((gx_f, gx), (ggate_f, ggate), (gw13, torch.cat([gw1, gw3], 1)), (gw2_f, gw2)):
        assert separate.abs().max() > 0
        torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="fused gu"):
        kernels.grouped_swiglu_backward(grad, x, tok, perm.gate_M, *_fused(ws), g, u, counts, pads, True, True, True)


@needs_library
def test_autocast_training_casts_gate_and_up_into_one_tensor(monkeypatch):
    """Under bf16 autocast the fp32 weights are cast anyway: the threaded experts get w1 and w3 cast
    into one fused tensor, and the gradients reach both parameters in fp32, equal to those of the
    separate casts."""
    from deepseek_moe.moe import GroupedExperts, dispatch

    calls = []
    real = kernels.grouped_swiglu
    monkeypatch.setattr(kernels, "grouped_swiglu", lambda *a: calls.append(a[4] is None) or real(*a))
    experts = GroupedExperts(5, 16, 24)
    for p in experts.parameters():
        torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(1))
    x, ids, w = torch.randn(9, 16), torch.randint(0, 5, (9, 2)), torch.rand(9, 2)
    grads = []
    for w13_fused in (True, False):
        if not w13_fused:  # the separate casts: a bf16 copy of the weights
            experts16 = GroupedExperts(5, 16, 24)
            experts16.load_state_dict(experts.state_dict())
            experts16.bfloat16()
        module = experts if w13_fused else experts16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = dispatch(x, ids, w, module)
        y.backward(torch.ones_like(y))
        grads.append([p.grad.float() for p in (module.w1, module.w3, module.w2)])
    assert calls == [True, False]
    assert all(p.grad.dtype == torch.float32 for p in experts.parameters())
    for fused, separate in zip(*grads):
        torch.testing.assert_close(fused, separate, rtol=2e-2, atol=1e-2 * separate.abs().max().item())


@needs_library
@pytest.mark.parametrize("fused", [False, True])
def test_grouped_swiglu_bf16_weight_gradients_from_transposed_copies(fused):
    """At 2^18 weights per matrix and more, bf16 multiplies a row-major copy of each weight
    gradient's left operand (dy^T, dg^T, du^T) instead of a transposed view: the gradients must be
    those of the same arithmetic in fp32, to bf16 precision."""
    x, perm, ws, counts = _grouped_inputs(torch.bfloat16, T=29, D=512, I=512, E=3, K=2)
    ws = _fused(ws) if fused else ws
    assert ws[0].shape[1] * ws[0].shape[2] >= 1 << 18
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        xs, gs, wd = x.to(dtype), grad.to(dtype), [None if w is None else w.to(dtype) for w in ws]
        _, g, u = kernels.grouped_swiglu(xs, perm.token_M, perm.gate_M, *wd, counts, counts)
        results.append(kernels.grouped_swiglu_backward(gs, xs, perm.token_M, perm.gate_M, *wd, g, u, counts,
                                                       counts, True, True, True))
    for bf, fp in zip(*results):
        if fp is None:  # fused: no gw3
            continue
        assert bf.abs().max() > 0
        torch.testing.assert_close(bf.float(), fp, rtol=3e-2, atol=3e-2 * fp.abs().max().item())


@needs_library
def test_expert_weight_gradients_reuse_the_memory_of_the_last_steps():
    """Weight gradients of 1 MiB and more come from blocks the library keeps: once a step's
    gradients are freed (zero_grad), the next step's take the same memory instead of fresh pages,
    live gradients never share a block, and a reused block is overwritten entirely (an expert
    without rows gets zeros, not the last step's values)."""
    from deepseek_moe.moe import GroupedExperts, dispatch

    E, D, I = 8, 264, 136  # 1.1 MB per gradient, a size no other test uses
    experts = GroupedExperts(E, D, I)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, D, generator=g)
    ids_all = torch.randint(0, E, (40, 2), generator=g)
    ids_some = torch.randint(0, E // 2, (40, 2), generator=g)  # experts 4-7 get no rows
    w = torch.rand(40, 2, generator=g)

    def step(ids, backend="threaded"):
        experts.backend = backend
        for p in experts.parameters():
            p.grad = None
        y, _ = dispatch(x, ids, w, experts)
        y.backward(torch.ones_like(y))
        return [p.grad for p in (experts.w1, experts.w3, experts.w2)]

    nbytes = experts.w1.numel() * 4
    first = step(ids_all)
    ptrs = {t.data_ptr() for t in first}
    assert len(ptrs) == 3
    free = kernels.gradient_blocks_free_bytes()
    del first
    for p in experts.parameters():
        p.grad = None  # as zero_grad: the blocks go back to the library
    assert kernels.gradient_blocks_free_bytes() == free + 3 * nbytes
    second = step(ids_some)
    assert {t.data_ptr() for t in second} == ptrs  # the same memory, not fresh pages
    assert kernels.gradient_blocks_free_bytes() == free
    reference = step(ids_some, backend="reference")
    for a, b in zip(second, reference):
        assert torch.equal(a[E // 2:], torch.zeros_like(a[E // 2:]))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    x16, perm, ws, counts = _grouped_inputs(torch.float32, T=40, D=D, I=I, E=E, K=2)
    grad = torch.randn(x16.shape, generator=g)
    _, gg, uu = kernels.grouped_swiglu(x16, perm.token_M, perm.gate_M, *ws, counts, counts)
    live = [kernels.grouped_swiglu_backward(grad, x16, perm.token_M, perm.gate_M, *ws, gg, uu, counts, counts,
                                            True, True, True)[2:] for _ in range(2)]
    live_ptrs = [t.data_ptr() for grads in live for t in grads]
    assert len(set(live_ptrs)) == 6 and not set(live_ptrs) & {t.data_ptr() for t in second}
    for a, b in zip(*live):
        assert torch.equal(a, b)


@needs_library
def test_grouped_swiglu_refuses_what_it_cannot_compute():
    x, perm, ws, counts = _grouped_inputs(torch.float32)
    bad = perm.token_M.clone()
    bad[3] = x.shape[0]
    with pytest.raises(RuntimeError, match="token index 37 out of range for 37 rows"):
        kernels.grouped_swiglu(x, bad, perm.gate_M, *ws, counts, counts)
    with pytest.raises(RuntimeError, match="each pad must be at least its count"):
        kernels.grouped_swiglu(x, perm.token_M, perm.gate_M, *ws, counts, [0] * len(counts))
    with pytest.raises(RuntimeError, match="of x's dtype"):
        kernels.grouped_swiglu(x, perm.token_M, perm.gate_M, ws[0].bfloat16(), *ws[1:], counts, counts)
    with pytest.raises(RuntimeError, match="one entry per expert"):
        kernels.grouped_swiglu(x, perm.token_M, perm.gate_M, *ws, counts[:-1], counts[:-1])


@needs_library
def test_cpu_training_takes_the_threaded_experts():
    from deepseek_moe.moe import GroupedExperts

    experts = GroupedExperts(4, 8, 12)
    assert experts.resolve_backend(torch.randn(2, 8)) == "threaded"
    assert experts.resolve_backend(torch.randn(2, 8, dtype=torch.float16)) == "padded"
    assert experts.fuses_dispatch(torch.randn(2, 8))


@needs_library
def test_threaded_experts_under_inference_mode():
    """Generation runs under ``torch.inference_mode``; the kernel's threads take the caller's mode
    (torch's worker threads do not have it), so the result is the one computed with gradients."""
    from deepseek_moe.moe import GroupedExperts, dispatch

    experts = GroupedExperts(5, 16, 24)
    for p in experts.parameters():
        torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(1))
    x, ids, w = torch.randn(9, 16), torch.randint(0, 5, (9, 2)), torch.rand(9, 2)
    with torch.inference_mode():
        y_inference, _ = dispatch(x, ids, w, experts)
    y, _ = dispatch(x, ids, w, experts)
    assert torch.equal(y_inference, y)


@needs_library
def test_routing_selection_and_sort_equal_torchs():
    """The router's top-k and the permutation's stable sort by expert in the package's kernel give
    torch.topk's and torch.sort's results (ties, which torch leaves unspecified, go to the lower
    index; NaN counts as the largest score)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(300, 63, generator=g)
    torch.testing.assert_close(kernels.topk_indices(scores, 7), torch.topk(scores, 7).indices, rtol=0, atol=0)
    scores[0, 40] = scores[0, 12] = 2.0
    scores[1, 30] = float("nan")
    ids = kernels.topk_indices(scores, 3)
    assert ids[0, :2].tolist() == [12, 40] and ids[1, 0].item() == 30
    experts = torch.randint(0, 63, (4000,), generator=g)
    for mine, torchs in zip(kernels.sort_by_expert(experts, 63), torch.sort(experts, stable=True)):
        assert torch.equal(mine, torchs)
    with pytest.raises(RuntimeError, match="expert id 63 out of range for 63 experts"):
        kernels.sort_by_expert(torch.tensor([0, 63]), 63)
    with pytest.raises(RuntimeError, match="k must be in"):
        kernels.topk_indices(scores, 64)


@needs_library
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norm, scale", [(False, 1.0), (True, 2.5)])
def test_routing_in_one_operation_picks_the_routers_experts(dtype, norm, scale):
    """A quantized model's routing of a few tokens without scores (``kernels.route_tokens``) picks
    the router's experts, largest first, with its gates within fp32 roundings (bf16 or fp32
    tokens and centroids); with scores asked for, more tokens, options or gradients it is the
    router's own steps."""
    from deepseek_moe.moe.router import ROUTE_KERNEL_ROWS, TopKRouter

    torch.manual_seed(0)
    router = TopKRouter(96, 13, 4, norm, scale).to(dtype)
    torch.nn.init.normal_(router.weight, std=0.3)
    router.use_kernel = True
    calls = []
    real = kernels.route_tokens
    kernels.route_tokens = lambda *a: calls.append(a[0].shape[0]) or real(*a)
    try:
        with torch.no_grad():
            for T in (1, 3, ROUTE_KERNEL_ROWS):
                x = torch.randn(T, 96).to(dtype)
                want, got = router(x), router(x, need_scores=False)
                assert got.scores_TE is None and want.scores_TE is not None
                assert torch.equal(got.topk_ids_TK, want.topk_ids_TK)
                torch.testing.assert_close(got.topk_weights_TK, want.topk_weights_TK, rtol=1e-5, atol=1e-7)
            assert calls == [1, 3, ROUTE_KERNEL_ROWS]
            assert router(torch.randn(ROUTE_KERNEL_ROWS + 1, 96).to(dtype), need_scores=False).scores_TE is not None
            assert router(x, top_k=2, need_scores=False).scores_TE is not None
        assert router(x, need_scores=False).scores_TE is not None  # with gradients
        router.use_kernel = False  # (an unquantized model's router)
        with torch.no_grad():
            assert router(x, need_scores=False).scores_TE is not None
        assert len(calls) == 3
    finally:
        kernels.route_tokens = real


@needs_library
@pytest.mark.parametrize("E, k", [(63, 7), (8, 8), (5, 2), (130, 9), (64, 64)])
def test_topk_indices_order_by_score_then_index(E, k):
    """The top-k kernel equals a readable selection (sort by score, largest first, then by index)
    on rows full of ties, NaN, infinities and both zeros, for expert counts that fill whole vectors
    of 8, leave a tail, or span more than one word of 64."""
    g = torch.Generator().manual_seed(E)
    values = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, float("inf"), -float("inf"), float("nan"), 1e-30, -1e30])
    scores = torch.cat([values[torch.randint(0, len(values), (200, E), generator=g)],
                        torch.randn(50, E, generator=g)])
    scores[-1] = -float("inf")  # every key at the bottom of the order
    scores[-2] = float("nan")

    def expected(row):
        key = [float("inf") if v != v else v for v in row.tolist()]
        return sorted(range(E), key=lambda e: (-key[e], e))[:k]

    got = kernels.topk_indices(scores, k)
    assert got.tolist() == [expected(row) for row in scores]


@needs_library
def test_routing_entropy_equals_entr_in_float64():
    """The entropy kernel's mean of -sum s log s equals torch's entr in float64 (softmax rows of
    odd sizes, scores of exactly 0), -v log v of single values over the whole positive range
    (its log), and keeps entr's rules: NaN stays NaN, a negative score gives -inf, no rows NaN."""
    g = torch.Generator().manual_seed(0)
    for T, E in [(4096, 63), (7, 5), (300, 130), (1, 1)]:
        s = (3 * torch.randn(T, E, generator=g)).softmax(-1)
        s[0, : E // 2] = 0
        want = torch.special.entr(s.double()).sum(-1).mean()
        torch.testing.assert_close(kernels.routing_entropy(s).double(), want, rtol=1e-6, atol=1e-7)
    v = torch.cat([torch.logspace(-37, 36, 3001), torch.rand(2000, generator=g)])  # -v log v fits fp32
    got = torch.stack([kernels.routing_entropy(x.view(1, 1)) for x in v])
    torch.testing.assert_close(got.double(), torch.special.entr(v.double()), rtol=1e-6, atol=0)
    assert kernels.routing_entropy(torch.tensor([[0.5, float("nan")]])).isnan()
    assert kernels.routing_entropy(torch.tensor([[0.5, -0.1]])).item() == -float("inf")
    assert kernels.routing_entropy(torch.zeros(0, 8)).isnan()  # as torch's mean over no rows


@pytest.mark.parametrize("H, Hkv, T", [(4, 4, 1), (4, 2, 37), (8, 8, 130)])
def test_decode_attention_equals_sdpa(H, Hkv, T):
    """One new token's attention over a cache (views of a longer buffer, as the cache hands them
    over; grouped heads too) equals torch's attention computed exactly, within a bf16 rounding
    (fp32: to 1e-5), and a bf16 model's decode step takes it."""
    if kernels.library_reason() is not None:
        pytest.skip(f"no library here: {kernels.library_reason()}")
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    d = 64
    k_buf, v_buf = (torch.randn(2, Hkv, T + 5, d, generator=g) for _ in range(2))
    q = torch.randn(2, 1, H, d, generator=g).transpose(1, 2)  # [B, H, 1, d], not contiguous
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2 ** -8)):
        qd, k, v = q.to(dtype), k_buf.to(dtype)[:, :, :T], v_buf.to(dtype)[:, :, :T]
        exact = F.scaled_dot_product_attention(qd.double(), k.double(), v.double(), enable_gqa=Hkv != H)
        out = kernels.decode_attention(qd, k, v, d ** -0.5)
        assert out.shape == (2, H, 1, d) and out.dtype == dtype
        assert ((out.double() - exact).abs() <= tol * exact.abs().clamp_min(0.1)).all()
    with pytest.raises(RuntimeError, match="must all be fp32 or all bf16"):
        kernels.decode_attention(q, k_buf.bfloat16(), v_buf, 1.0)


def test_a_bf16_models_decode_step_takes_the_attention_kernel(monkeypatch):
    if kernels.library_reason() is not None:
        pytest.skip(f"no library here: {kernels.library_reason()}")
    from deepseek_moe.model import DeepseekForCausalLM, KVCache
    from deepseek_moe.presets import get_config

    torch.manual_seed(0)
    model = DeepseekForCausalLM(get_config("tiny", vocab_size=97, num_hidden_layers=2)).eval().to(torch.bfloat16)
    ids = torch.randint(0, 97, (1, 9))
    calls = []
    real = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        full = model(ids).logits[0, -1].float()
        cache = KVCache.for_model(model, 1, 16)
        model(ids[:, :8], cache=cache)
        step = model(ids[:, 8:], cache=cache).logits[0, -1].float()
    assert len(calls) == 2  # one per layer, for the one new token only
    assert torch.allclose(step, full, atol=0.05 * full.abs().max().item())


def _random_quantized_bf16(cfg, bits: int, group: int, expert_list: bool = False):
    """A model of ``cfg`` quantized (``bits``, ``group``) with random weights, in bf16; and the
    generator that made them, for its inputs. ``expert_list``: one module per expert, as a
    quantized checkpoint loads."""
    from deepseek_moe.model import DeepseekForCausalLM
    from deepseek_moe.moe.layer import use_expert_list
    from deepseek_moe.quant import quantize_modules, quantized_layers

    torch.manual_seed(0)
    model = DeepseekForCausalLM(cfg).eval()
    if expert_list:
        use_expert_list(model)
    quantize_modules(model, bits, group)
    g = torch.Generator().manual_seed(0)
    for m in quantized_layers(model):
        for k, v in quantize_weight(torch.randn(m.out_features, m.in_features, generator=g) * 0.05, m.bits,
                                    m.group_size).items():
            getattr(m, k).copy_(v)
    return model.to(torch.bfloat16), g


@pytest.mark.parametrize("batch", [1, 2])
def test_one_operation_from_projections_to_attention_equals_the_steps(monkeypatch, batch):
    """A quantized bf16 model's decode steps with its attention block in one operation
    (``attention_block``: norm, projections, rotation, the cache's slot, attention, output
    projection, residual), or from the projections to the attention in one
    (``decode_attention_rope``), give the logits and the caches of the same steps taken one by
    one, bit for bit, over several new tokens and rows."""
    if not kernels.available():
        pytest.skip(f"no kernel here: {kernels.load()}")
    from deepseek_moe import model as model_module
    from deepseek_moe.model import KVCache
    from deepseek_moe.presets import get_config

    model, g = _random_quantized_bf16(get_config("tiny", vocab_size=97, num_hidden_layers=2), 4, 64)
    prompt, steps = torch.randint(0, 97, (batch, 5), generator=g), torch.randint(0, 97, (batch, 4), generator=g)

    def decode():
        cache = KVCache.for_model(model, batch, 12)
        with torch.inference_mode():
            model(prompt, cache=cache)
            logits = [model(steps[:, i:i + 1], cache=cache).logits for i in range(steps.shape[1])]
        return torch.cat(logits, 1), cache

    calls, blocks = [], []
    real, real_block = kernels.decode_attention_rope, kernels.attention_block
    monkeypatch.setattr(kernels, "decode_attention_rope", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(kernels, "attention_block", lambda *a: blocks.append(1) or real_block(*a))
    whole, whole_cache = decode()  # norm, projections, attention, output projection, residual: one operation
    assert len(blocks) == 2 * steps.shape[1] and not calls  # every layer's every new token
    monkeypatch.setattr(model_module.Attention, "decode_block", lambda *a: None)
    fused, fused_cache = decode()  # from the projections to the attention: one operation
    assert len(calls) == 2 * steps.shape[1] and len(blocks) == 2 * steps.shape[1]
    unfused_linears = model_module.fused_linears
    monkeypatch.setattr(model_module, "fused_linears",
                        lambda layers, x, fp32=False: None if fp32 else unfused_linears(layers, x))
    stepwise, stepwise_cache = decode()
    assert len(calls) == 2 * steps.shape[1]  # the steps one by one this time
    assert torch.equal(fused, stepwise) and torch.equal(whole, stepwise)
    for a, b, c in zip(fused_cache.k + fused_cache.v, stepwise_cache.k + stepwise_cache.v, whole_cache.k + whole_cache.v):
        assert torch.equal(a, b) and torch.equal(c, b)


@pytest.mark.parametrize("bits, group", [(8, 128), (4, 64)])
def test_one_tokens_moe_block_in_one_operation_equals_the_steps(monkeypatch, bits, group):
    """A quantized bf16 model decoding with no statistics (generation): each MoE layer's block in
    one operation (``moe_block``: norm, routing, routed and shared experts, residual) gives the
    logits and the assignments per expert of the same steps taken one by one, bit for bit; after an
    expert's stored tensors are replaced, the operation reads the new ones."""
    if not kernels.available():
        pytest.skip(f"no kernel here: {kernels.load()}")
    from deepseek_moe.model import KVCache
    from deepseek_moe.moe.layer import DeepseekMoE
    from deepseek_moe.presets import get_config

    cfg = get_config("tiny", vocab_size=97, hidden_size=128, moe_intermediate_size=64, n_shared_experts=2,
                     n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1, num_hidden_layers=3)
    model, g = _random_quantized_bf16(cfg, bits, group, expert_list=True)
    expert = model.model.layers[-1].mlp.experts[1].up_proj
    assert expert.bits == bits
    prompt, steps = torch.randint(0, 97, (1, 5), generator=g), torch.randint(0, 97, (1, 4), generator=g)
    n_moe = sum(1 for layer in model.model.layers if layer.is_moe)

    def decode():
        cache = KVCache.for_model(model, 1, 12)
        with torch.inference_mode():
            model(prompt, cache=cache, routing_stats=False)
            outs = [model(steps[:, i:i + 1], cache=cache, routing_stats=False) for i in range(steps.shape[1])]
        return torch.cat([o.logits for o in outs], 1), torch.stack([o.tokens_per_expert for o in outs])

    blocks = []
    real = kernels.moe_block
    monkeypatch.setattr(kernels, "moe_block", lambda *a: blocks.append(1) or real(*a))
    whole, whole_counts = decode()
    assert len(blocks) == n_moe * steps.shape[1]  # every MoE layer's every new token
    with monkeypatch.context() as m:
        m.setattr(DeepseekMoE, "decode_block", lambda *a: None)
        stepwise, stepwise_counts = decode()
    assert len(blocks) == n_moe * steps.shape[1]
    assert torch.equal(whole, stepwise) and torch.equal(whole_counts, stepwise_counts)
    assert whole_counts.sum().item() == n_moe * steps.shape[1] * cfg.num_experts_per_tok
    twin = copy.deepcopy(model)  # the tables are the library's, not the model's: it copies as before
    torch.save(twin.state_dict(), io.BytesIO())
    # every expert's up projection replaced by new tensors: the table follows
    for layer in model.model.layers:
        if layer.is_moe:
            for e in layer.mlp.experts:
                for name, t in e.up_proj.stored().items():
                    setattr(e.up_proj, name, t.flip(0).clone())
    changed, _ = decode()
    assert not torch.equal(changed, whole)
    with monkeypatch.context() as m:
        m.setattr(DeepseekMoE, "decode_block", lambda *a: None)
        assert torch.equal(changed, decode()[0])


@pytest.mark.parametrize("bits, group", [(8, 128), (4, 64)])
def test_generation_steps_through_the_decode_plan_with_the_same_numbers(monkeypatch, bits, group):
    """One row of a quantized bf16 model: generation's steps through the decode plan (each served
    layer in two operations, no module calls) give forward's logits and cache bit for bit, and
    the same tokens; a layer the kernels do not serve takes its modules inside the plan; no plan
    without quantized layers, or for a batch."""
    if not kernels.available():
        pytest.skip(f"no kernel here: {kernels.load()}")
    from deepseek_moe.generate import generate
    from deepseek_moe.model import DeepseekForCausalLM, KVCache
    from deepseek_moe.presets import get_config

    cfg = get_config("tiny", vocab_size=97, hidden_size=128, moe_intermediate_size=64, n_shared_experts=2,
                     n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1, num_hidden_layers=3)
    model, g = _random_quantized_bf16(cfg, bits, group, expert_list=True)
    prompt, steps = torch.randint(0, 97, (1, 5), generator=g), torch.randint(0, 97, (1, 4), generator=g)

    def both(plan_of):
        caches = [KVCache.for_model(model, 1, 12) for _ in range(2)]
        with torch.inference_mode():
            for c in caches:
                model(prompt, cache=c, routing_stats=False)
            plan = plan_of(caches[0])
            fast = [model.decode_step(steps[:, i:i + 1], caches[0], plan) for i in range(steps.shape[1])]
            slow = [model(steps[:, i:i + 1], cache=caches[1], routing_stats=False).logits for i in range(steps.shape[1])]
        assert all(torch.equal(a, b) for a, b in zip(fast, slow))
        assert all(torch.equal(a, b) for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v))
        return plan

    plan = both(model.decode_plan)
    assert plan[0] is None and all(e is not None for e in plan[1:])  # the dense layer takes its modules
    blocks = []
    real = kernels.moe_block
    monkeypatch.setattr(kernels, "moe_block", lambda *a: blocks.append(1) or real(*a))
    fast = generate(model, [prompt[0].tolist()], 6, greedy=True)
    assert len(blocks) == 2 * 5  # the 5 new tokens fed back, both MoE layers, through the plan
    with monkeypatch.context() as m:
        m.setattr(DeepseekForCausalLM, "decode_plan", lambda *a: None)
        assert generate(model, [prompt[0].tolist()], 6, greedy=True) == fast
    model.model.layers[1].mlp.dispatch = "reference"  # not served: its modules, inside the plan
    plan = both(model.decode_plan)
    assert plan[1] is None and plan[2] is not None
    with torch.inference_mode():
        assert model.decode_plan(KVCache.for_model(model, 2, 12)) is None
        plain = DeepseekForCausalLM(cfg).eval().to(torch.bfloat16)
        assert plain.decode_plan(KVCache.for_model(plain, 1, 12)) is None


@needs_gemm
def test_the_avx2_and_vnni_kernels_give_the_same_numbers(tmp_path):
    """One row of int4 and of int8 (decoding) on the AVX2 kernels (``DEEPSEEK_MOE_AVX2_ONLY=1``, in
    another process) and on the AVX512-VNNI ones here: the same integer sums, bit for bit; the
    integer GEMM is off there."""
    from safetensors.torch import load_file, save_file

    x = torch.randn(1, 512)
    tensors = {"x": x}
    for bits, group in ((4, 128), (4, 64), (8, 0)):
        stored = _stored(bits, group or 128, 3, 48, 512, seed=bits + group)
        for i, t in enumerate(stored):
            tensors.update({f"{bits}.{group}.{i}.{k}": v for k, v in t.items()})
        tensors[f"out.{bits}.{group}"] = _call(x, stored, bits, group, [0, 0, 0], [1, 1, 1])
    save_file(tensors, tmp_path / "here.safetensors")
    code = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import load_file, save_file
        from deepseek_moe import kernels
        assert kernels.available() and not kernels.gemm_available()
        t = load_file({str(tmp_path / "here.safetensors")!r})
        out = {{}}
        for bits, group in ((4, 128), (4, 64), (8, 0)):
            key = "weight" if bits == 8 else "weight_packed"
            w = [t[f"{{bits}}.{{group}}.{{i}}.{{key}}"] for i in range(3)]
            s = [t[f"{{bits}}.{{group}}.{{i}}.weight_scale"] for i in range(3)]
            z = [t[f"{{bits}}.{{group}}.{{i}}.weight_zero"] for i in range(3)] if bits == 4 else []
            out[f"out.{{bits}}.{{group}}"] = kernels.quant_gemv(t["x"], w, s, z, [0, 0, 0], [1, 1, 1], bits, group)
        save_file(out, {str(tmp_path / "avx2.safetensors")!r})
    """)
    env = dict(os.environ, DEEPSEEK_MOE_AVX2_ONLY="1")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    there = load_file(tmp_path / "avx2.safetensors")
    assert len(there) == 3
    for name, value in there.items():
        assert torch.equal(value, tensors[name]), name
