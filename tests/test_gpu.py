"""GPU-only checks (marked ``gpu``; skipped cleanly without CUDA)."""

from __future__ import annotations

import pytest
import torch

from deepseek_moe.moe import GroupedExperts, dispatch, dispatch_reference


def _routed_inputs(dtype):
    """8 experts (128 -> 64 -> 128) and 256 tokens routed top-2 at random, on the GPU."""
    torch.manual_seed(0)
    experts = GroupedExperts(8, 128, 64).cuda().to(dtype)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(256, 128, device="cuda", dtype=dtype)
    ids = torch.stack([torch.randperm(8, device="cuda")[:2] for _ in range(256)])
    w = torch.rand(256, 2, device="cuda")
    return experts, x, ids, w


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dispatch_on_cuda_matches_reference(dtype):
    experts, x, ids, w = _routed_inputs(dtype)
    y, _ = dispatch(x, ids, w, experts)  # grouped_mm in bf16, loop in fp32
    y_ref, _ = dispatch_reference(x, ids, w, experts)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dispatch_gradients_on_cuda_match_reference(dtype):
    experts, x, ids, w = _routed_inputs(dtype)
    gy = torch.randn(256, 128, device="cuda", dtype=dtype)
    grads = []
    for fn in (dispatch, dispatch_reference):
        for p in experts.parameters():
            p.grad = None
        xi = x.clone().requires_grad_(True)
        wi = w.clone().requires_grad_(True)
        y, _ = fn(xi, ids, wi, experts)
        y.backward(gy.to(y.dtype))
        grads.append([xi.grad, wi.grad] + [p.grad for p in experts.parameters()])
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for g, g_ref in zip(*grads):
        torch.testing.assert_close(g.float(), g_ref.float(), rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["deepseekmoe-tiny", "gshard-tiny", "hash-tiny", "dense-tiny"])
def test_model_step_on_cuda_matches_cpu(preset):
    """One fp32 forward/backward of a whole model on the GPU equals the CPU's; under bf16
    autocast the loss stays close and every gradient is finite."""
    from deepseek_moe.model import DeepseekForCausalLM
    from deepseek_moe.presets import get_config

    cfg = get_config(preset, vocab_size=512)
    torch.manual_seed(0)
    cpu = DeepseekForCausalLM(cfg)
    gpu = DeepseekForCausalLM(cfg).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randint(0, 512, (4, 64))
    out_c = cpu(x, labels=x)
    out_c.loss.backward()
    out_g = gpu(x.cuda(), labels=x.cuda())
    out_g.loss.backward()
    torch.testing.assert_close(out_g.loss.cpu(), out_c.loss, rtol=1e-4, atol=1e-4)
    for (n, pc), pg in zip(cpu.named_parameters(), gpu.parameters()):
        if pc.grad is None:
            assert pg.grad is None, n
            continue
        torch.testing.assert_close(pg.grad.cpu(), pc.grad, rtol=1e-3, atol=1e-5, msg=n)
    gpu.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_b = gpu(x.cuda(), labels=x.cuda())
    out_b.loss.backward()
    assert abs(out_b.loss.item() - out_c.loss.item()) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.parametrize("capacity", [None, 1.0])
def test_training_step_never_synchronises_with_the_host(capacity):
    """Forward, backward, clipping and AdamW under bf16 autocast with the default backend
    (grouped_mm): any op that waits for the GPU to read a value back raises."""
    from deepseek_moe.model import DeepseekForCausalLM
    from deepseek_moe.presets import get_config
    from deepseek_moe.train import TrainConfig, build_optimizer

    cfg = get_config("deepseekmoe-tiny", vocab_size=512, capacity_factor=capacity)
    torch.manual_seed(0)
    model = DeepseekForCausalLM(cfg).cuda()
    opt = build_optimizer(model, TrainConfig(steps=1))
    x = torch.randint(0, 512, (4, 64), device="cuda")
    for step in range(2):  # the second step runs with the optimizer state in place
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x, labels=x)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item()
