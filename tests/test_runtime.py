"""The process-wide choices: freed memory kept, the CPU's fastest dtype, and a training step that
compiles whole (no graph break means no host synchronisation)."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from deepseek_moe import runtime
from deepseek_moe.model import DeepseekForCausalLM
from deepseek_moe.presets import get_config

TINY = dict(vocab_size=256, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
            moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_keep_freed_memory_stops_glibc_returning_big_blocks():
    """After the setting, a freed 64 MB block is reused without being mapped again: touching a
    second 64 MB allocation costs no new page faults (glibc's default would unmap the first at
    free() and fault all 16384 pages of the second in)."""
    import resource

    assert runtime.keep_freed_memory() is True
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    n = 64 << 20

    def touch(p):
        ctypes.memset(p, 1, n)

    p = libc.malloc(n)
    touch(p)
    libc.free(p)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    q = libc.malloc(n)
    touch(q)
    new_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    libc.free(q)
    assert new_faults < 100  # a fresh mapping would fault 16384 pages of 4 KB back in


def test_auto_dtype_follows_the_measurement(monkeypatch):
    monkeypatch.delenv(runtime.AUTO_DTYPE_ENV, raising=False)
    runtime.fastest_cpu_dtype.cache_clear()
    try:
        monkeypatch.setattr(runtime, "cpu_matmul_speeds", lambda: {"float32": 250.0, "bfloat16": 2050.0})
        assert runtime.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
        runtime.fastest_cpu_dtype.cache_clear()
        monkeypatch.setattr(runtime, "cpu_matmul_speeds", lambda: {"float32": 350.0, "bfloat16": 63.0})
        assert runtime.resolve_dtype("auto", torch.device("cpu")) is None  # plain fp32
        runtime.fastest_cpu_dtype.cache_clear()
        monkeypatch.setenv(runtime.AUTO_DTYPE_ENV, "bfloat16")  # pinned: no measurement
        assert runtime.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    finally:
        runtime.fastest_cpu_dtype.cache_clear()
    assert runtime.resolve_dtype("float32", torch.device("cpu")) is None
    assert runtime.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype must be one of"):
        runtime.resolve_dtype("fp8", torch.device("cpu"))
    speeds = runtime.cpu_matmul_speeds()  # the real probe runs and gives two positive rates
    assert speeds["float32"] > 0 and speeds["bfloat16"] > 0


def test_training_step_compiles_whole_and_matches_eager():
    """``torch.compile(fullgraph=True)`` of the model's training forward (router, permute,
    grouped_mm experts, combine, balance losses, the token-id check) and its backward: a host
    synchronisation would be a graph break, and fullgraph turns a graph break into an error."""
    torch._dynamo.reset()
    cfg = get_config("deepseekmoe-tiny", **TINY)
    torch.manual_seed(0)
    model = DeepseekForCausalLM(cfg)
    eager = DeepseekForCausalLM(cfg)
    eager.load_state_dict(model.state_dict())
    for m in eager.modules():
        if hasattr(m, "backend"):
            m.backend = "grouped_mm"
    compiled = runtime.compile_model(model)
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x, labels=x)
        ref = eager(x, labels=x)
    out.loss.backward()
    ref.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) < 1e-2
    assert out.tokens_per_expert.sum().item() == ref.tokens_per_expert.sum().item() > 0
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cos > 0.99, (name, cos.item())
