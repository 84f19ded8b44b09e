"""GPU-only checks (marked ``gpu``; skipped cleanly without CUDA)."""

from __future__ import annotations

import pytest
import torch

from deepseek_moe.moe import GroupedExperts, dispatch_reference, dispatch_sorted


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dispatch_on_cuda_matches_reference(dtype):
    torch.manual_seed(0)
    experts = GroupedExperts(8, 128, 64).cuda().to(dtype)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(256, 128, device="cuda", dtype=dtype)
    ids = torch.stack([torch.randperm(8, device="cuda")[:2] for _ in range(256)])
    w = torch.rand(256, 2, device="cuda")
    y, _ = dispatch_sorted(x, ids, w, experts)  # grouped_mm in bf16, loop in fp32
    y_ref, _ = dispatch_reference(x, ids, w, experts)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
