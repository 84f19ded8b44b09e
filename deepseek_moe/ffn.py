"""The SwiGLU feed-forward network: the dense FFN, the shared experts, and each routed expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quant import fused_linears


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; parameter names follow the released checkpoint. With
    quantized weights and a few rows (decoding), gate and up take one kernel call
    (``quant.fused_linears``)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = fused_linears((self.gate_proj, self.up_proj), x)
        if gate_up is not None:
            return self.down_proj(F.silu(gate_up[0]) * gate_up[1])
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
