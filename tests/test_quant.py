"""Weight-only int8 / int4: the kernels against the dequantized weight, the streaming converter,
and a quantized checkpoint loaded by every command."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deepseek_moe.checkpoint import CheckpointError, load_pretrained, save_pretrained
from deepseek_moe.generate import generate
from deepseek_moe.model import DeepseekForCausalLM
from deepseek_moe.moe.experts import ExpertList
from deepseek_moe.presets import get_config
from deepseek_moe.quant import (GEMV_SINGLE_ROWS, GEMV_SINGLE_ROWS_FP32, INT4_KERNEL_ROWS, INT_GEMM_ROWS, INT8_KERNEL_ROWS,
                                QuantLinear, bits_for, dequantize, quantize_weight)
from deepseek_moe.quantize import quantize_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# A dense first layer, 2 shared experts, widths that int4 groups of 32 divide.
SMALL = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
             num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=128, moe_intermediate_size=32,
             n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=2)


@pytest.mark.parametrize("gemm_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("int_gemm", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_kernels_equal_the_dequantized_weight(bits, int_gemm, gemm_dtype, monkeypatch):
    """Every path of ``QuantLinear`` on both sides of each switch: on a CPU whose bf16 GEMM is the
    faster, this package's kernel for up to ``GEMV_SINGLE_ROWS[bits]`` rows, torch's int8 kernel
    (int4: only without the package's kernel), then a bf16 GEMM; on one without (fp32), this
    package's kernel for up to ``GEMV_SINGLE_ROWS_FP32`` rows, then an fp32 GEMM; on a CPU with
    AVX512-VNNI, the few-row kernel below ``INT_GEMM_ROWS[bits]`` rows and the integer GEMM from
    there. No converted copy of the weight is kept (torch's int4 kernel would keep one)."""
    from deepseek_moe import kernels, quant, runtime

    if int_gemm and not kernels.gemm_available():
        pytest.skip("no AVX512-VNNI integer GEMM on this processor")
    monkeypatch.setattr(quant, "_int_gemm", lambda: int_gemm)
    monkeypatch.setenv(runtime.AUTO_DTYPE_ENV, gemm_dtype)
    runtime.fastest_cpu_dtype.cache_clear()
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.02
    stored = quantize_weight(w, bits, 64)
    deq = dequantize(stored, bits, 64, torch.float32)
    err = ((deq - w).norm() / w.norm()).item()
    assert err < (0.01 if bits == 8 else 0.1)  # what 8 and 4 bits can hold of Gaussian weights
    m = QuantLinear(256, 96, bits, 64)
    for k, v in stored.items():
        getattr(m, k).copy_(v)
    single = GEMV_SINGLE_ROWS_FP32 if gemm_dtype == "float32" else GEMV_SINGLE_ROWS[bits]
    switches = [single] + ([] if gemm_dtype == "float32" else [INT8_KERNEL_ROWS if bits == 8 else INT4_KERNEL_ROWS])
    if int_gemm:
        single, switches = INT_GEMM_ROWS[bits] - 1, [INT_GEMM_ROWS[bits]]
    calls, gemm_calls = [], []
    real = kernels.quant_gemv
    monkeypatch.setattr(kernels, "quant_gemv", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    for name in ("quant_gemm_int8", "quant_gemm_int4"):
        monkeypatch.setattr(kernels, name, lambda x, *a, f=getattr(kernels, name): gemm_calls.append(x.shape[0]) or f(x, *a))
    # x has B rows per count (B = 2; 1 for the integer GEMM, whose int8 switch is at 2 rows): both
    # sides of each switch, and past them
    B = 1 if int_gemm else 2
    row_counts = sorted({1, 3, max(switches), *(s // B + d for s in switches for d in (-1, 0, 1) if s // B + d > 0)})
    try:
        for rows in row_counts:
            x = torch.randn(B, rows, 256)
            ref = x.bfloat16().float() @ deq.T
            y = m(x)
            assert y.shape == (B, rows, 96) and y.dtype == torch.bfloat16
            assert ((y.float() - ref).norm() / ref.norm()).item() < 0.01
    finally:
        runtime.fastest_cpu_dtype.cache_clear()
    if kernels.available():  # the package's kernel up to its limit only
        assert calls == [B * r for r in row_counts if B * r <= single] and len(calls) >= (1 if int_gemm else 2)
        assert gemm_calls == ([B * r for r in row_counts if B * r > single] if int_gemm else [])
        assert len(gemm_calls) >= (2 if int_gemm else 0)
        assert m._kernel_weight is None


def test_what_is_quantized():
    for bits in (8, 4):
        assert bits_for("model.layers.3.mlp.experts.17.gate_proj.weight", (1408, 2048), bits) == bits
        assert bits_for("model.layers.0.self_attn.q_proj.weight", (64, 64), bits) == bits
        assert bits_for("model.layers.2.mlp.shared_experts.down_proj.weight", (64, 64), bits) == bits
        assert bits_for("lm_head.weight", (512, 64), bits) == 8  # the head: int8 in both schemes
        assert bits_for("lm_head.weight", (512, 64), bits, tied=True) is None
        for name in ("model.embed_tokens.weight", "model.layers.1.mlp.gate.weight"):
            assert bits_for(name, (512, 64), bits) is None
        assert bits_for("model.layers.0.input_layernorm.weight", (64,), bits) is None
    # int4's kernel takes inputs in groups of 32 and outputs in multiples of 16; else int8
    assert bits_for("model.layers.1.mlp.experts.0.down_proj.weight", (128, 88), 4) == 8
    assert bits_for("model.layers.1.mlp.experts.0.up_proj.weight", (88, 128), 4) == 8


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    torch.manual_seed(0)
    model = DeepseekForCausalLM(get_config("deepseekmoe-tiny", **SMALL))
    path = tmp_path_factory.mktemp("src") / "ckpt"
    save_pretrained(model, path, dtype=torch.bfloat16)
    (path / "tokenizer_config.json").write_text("{}")
    return path


@pytest.mark.parametrize("bits, tol", [(8, 0.02), (4, 0.2)])
def test_quantized_checkpoint_computes_close_to_the_original(source, tmp_path, bits, tol):
    out = quantize_checkpoint(source, tmp_path / f"int{bits}", bits, 32, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == bits and cfg["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer_config.json").is_file()  # companions travel with the weights
    q = load_pretrained(out)
    ref = load_pretrained(source, dtype=torch.bfloat16)
    assert isinstance(q.model.layers[1].mlp.experts, ExpertList)
    assert isinstance(q.model.layers[1].mlp.experts[3].up_proj, QuantLinear)
    assert isinstance(q.model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(q.lm_head, QuantLinear) and q.lm_head.bits == 8
    assert q.model.embed_tokens.weight.dtype == torch.bfloat16
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        a, b = q(x).logits.float(), ref(x).logits.float()
    assert ((a - b).norm() / b.norm()).item() < tol
    # greedy decoding (one row at a time: the kernels) agrees with prefill (the GEMM path)
    with torch.no_grad():
        toks = generate(q, [x[0, :8].tolist()], 6, greedy=True)[0]
        full = q(torch.tensor([x[0, :8].tolist() + toks[:-1]])).logits[0, 7:].argmax(-1).tolist()
    assert toks == full


def test_quantize_refuses_what_it_must(source, tmp_path):
    out = quantize_checkpoint(source, tmp_path / "q", 8, progress=False)
    with pytest.raises(CheckpointError, match="quantized already"):
        quantize_checkpoint(out, tmp_path / "again", 4, progress=False)
    with pytest.raises(CheckpointError, match="not empty"):
        quantize_checkpoint(source, out, 4, progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    quantize_checkpoint(source, out, 4, 32, force=True, progress=False)  # replaces a checkpoint
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        quantize_checkpoint(source, tmp_path / "mine", 8, force=True, progress=False)
    with pytest.raises(ValueError, match="group size must be one of 256, 128, 64, 32, got 48"):
        quantize_checkpoint(source, tmp_path / "g", 4, 48, progress=False)
    assert not (tmp_path / "g").exists()
    with pytest.raises(ValueError, match="computes in bf16"):
        load_pretrained(out, dtype=torch.float32)


def test_the_converter_streams(tmp_path):
    """Peak memory stays far under the model's size: one shard and one tensor at a time."""
    cfg = get_config("deepseekmoe-tiny", vocab_size=512, hidden_size=512, num_attention_heads=8,
                     num_key_value_heads=8, num_hidden_layers=6, moe_intermediate_size=256,
                     n_routed_experts=32, num_experts_per_tok=4)
    with torch.device("meta"):
        n = sum(p.numel() for p in DeepseekForCausalLM(cfg).parameters())
    script = textwrap.dedent(f"""
        import resource, sys, torch
        from deepseek_moe.checkpoint import save_pretrained
        from deepseek_moe.model import DeepseekForCausalLM
        from deepseek_moe.presets import get_config
        from deepseek_moe.quantize import quantize_checkpoint
        cfg = get_config("deepseekmoe-tiny", **{dict(vocab_size=512, hidden_size=512, num_attention_heads=8,
                         num_key_value_heads=8, num_hidden_layers=6, moe_intermediate_size=256,
                         n_routed_experts=32, num_experts_per_tok=4)!r})
        with torch.device("meta"):
            m = DeepseekForCausalLM(cfg)
        m = m.to_empty(device="cpu")
        for p in m.parameters():
            p.data.normal_(0, 0.02)
        save_pretrained(m, sys.argv[1], max_shard_size="16MB", dtype=torch.bfloat16)
        del m, p
        import gc; gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        quantize_checkpoint(sys.argv[1], sys.argv[2], 8, shard_size="16MB", progress=False)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(before, after)
    """)
    # The peak so far is the source model in fp32; quantizing must not raise it by a model's worth.
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "src"), str(tmp_path / "q")],
                       capture_output=True, text=True, cwd=ROOT, check=True)
    before, after = map(int, r.stdout.split())
    model_kib = n * 2 // 1024  # bf16 source
    assert after - before < model_kib // 4, (before, after, model_kib)


def test_quantize_command_and_generate(source, tmp_path):
    out = tmp_path / "q4"
    r = subprocess.run([sys.executable, "-m", "deepseek_moe", "quantize", str(source), str(out), "--bits", "4",
                        "--group-size", "32", "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"quantized {source} -> {out}: int4")
    r = subprocess.run([sys.executable, "-m", "deepseek_moe", "quantize", str(source), str(out), "--bits", "8"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: refusing to write into") and len(r.stderr.splitlines()) == 1


def test_int4_groups_fall_back_to_what_divides_the_inputs(source, tmp_path):
    """Groups of 128 where the inputs allow it, else the largest of 64 and 32 that divides them
    (the released 16B's dense FFN has 10944 inputs); the stored scales say which."""
    q = load_pretrained(quantize_checkpoint(source, tmp_path / "q", 4, 128, progress=False))
    attn = q.model.layers[0].self_attn.q_proj  # 64 inputs
    down = q.model.layers[1].mlp.experts[0].down_proj  # 32 inputs
    dense = q.model.layers[0].mlp.down_proj  # 128 inputs
    assert (attn.group_size, down.group_size, dense.group_size) == (64, 32, 128)
    assert dense.weight_scale.shape == (64, 1) and down.weight_scale.shape == (64, 1)
    x = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(q(x).logits.float()).all()


def test_int8_weights_are_aligned_for_the_kernel(source, tmp_path):
    """The int8 kernel crashes on rows that are not 16-byte aligned: quantize's files start every
    int8 weight of these shapes at a multiple of 64 bytes, and a weight mapped from any other
    file is copied once where it is not aligned."""
    q = load_pretrained(quantize_checkpoint(source, tmp_path / "q8", 8, progress=False))
    weights = [m.weight for m in q.modules() if isinstance(m, QuantLinear)]
    assert weights and all(w.data_ptr() % 64 == 0 for w in weights)
    m = next(m for m in q.modules() if isinstance(m, QuantLinear))
    buf = torch.empty(m.weight.numel() + 64, dtype=torch.int8)
    off = (8 - buf.data_ptr()) % 64 or 8  # an address 8 bytes past a 64-byte boundary
    unaligned = buf[off:off + m.weight.numel()].view(m.weight.shape)
    unaligned.copy_(m.weight)
    assert unaligned.data_ptr() % 16
    x = torch.randn(GEMV_SINGLE_ROWS[8] + 2, m.in_features)  # rows for torch's int8 kernel
    expected = m(x)
    m.weight = unaligned
    assert torch.equal(m(x), expected)


def test_int4_falls_back_to_int8_where_its_kernel_cannot_go(tmp_path):
    """The tiny presets' experts are 88 wide: the int4 kernel takes neither 88 inputs (groups of
    32) nor 88 outputs (multiples of 16), so they are int8; the rest is int4, the head int8."""
    cfg = get_config("deepseekmoe-tiny", num_hidden_layers=1)
    save_pretrained(DeepseekForCausalLM(cfg), tmp_path / "src", dtype=torch.bfloat16)
    q4 = load_pretrained(quantize_checkpoint(tmp_path / "src", tmp_path / "q4", 4, progress=False))
    expert = q4.model.layers[0].mlp.experts[0]
    assert {m.bits for m in (expert.gate_proj, expert.up_proj, expert.down_proj)} == {8}
    assert q4.model.layers[0].self_attn.q_proj.bits == 4 and q4.lm_head.bits == 8  # 128 x 128
    x = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(q4(x).logits.float()).all()


def test_a_quantized_model_counts_its_parameters(source, tmp_path):
    q = load_pretrained(quantize_checkpoint(source, tmp_path / "q", 4, 32, progress=False))
    ref = load_pretrained(source)
    assert q.num_parameters() == ref.num_parameters() == sum(p.numel() for p in ref.parameters())


def test_a_quantized_model_is_not_saved_as_unquantized(source, tmp_path):
    q = load_pretrained(quantize_checkpoint(source, tmp_path / "q", 8, progress=False))
    with pytest.raises(CheckpointError, match="cannot save a quantized model"):
        q.save_pretrained(tmp_path / "again")
    r = subprocess.run([sys.executable, "-m", "deepseek_moe", "export", str(tmp_path / "q"), str(tmp_path / "e")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "cannot save a quantized model" in r.stderr
    assert not (tmp_path / "again").exists() and not (tmp_path / "e").exists()
