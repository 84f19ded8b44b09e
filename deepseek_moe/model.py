"""The DeepSeekMoE causal language model (decoder-only Transformer, SPEC section 1).

Pre-norm RMSNorm, rotary positions, multi-head attention through scaled_dot_product_attention,
SwiGLU FFNs; layer i uses an MoE FFN when ``config.is_moe_layer(i)``. Module names mirror the
released checkpoint (``model.layers.{i}.self_attn.q_proj`` ...), so the converter only has to
stack and unstack the routed experts.

Shape legend: B batch, S sequence, D hidden, H heads, Hkv key/value heads, hd head dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeepseekMoEConfig
from .ffn import SwiGLU
from .moe import DeepseekMoE, MoEAux


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the model dtype (as the released code does).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    positions_S: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [S, hd] for rotate-half RoPE, computed in fp32."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions_S.device, dtype=torch.float32) / head_dim)
    )
    freqs_S = torch.outer(positions_S.float(), inv_freq)
    emb = torch.cat((freqs_S, freqs_S), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x_BHSd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHSd.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x_BHSd * cos_Sd + rotated * sin_Sd


class Attention(nn.Module):
    def __init__(self, config: DeepseekMoEConfig):
        super().__init__()
        D, H, Hkv, hd = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, hd
        bias = config.attention_bias
        self.q_proj = nn.Linear(D, H * hd, bias=bias)
        self.k_proj = nn.Linear(D, Hkv * hd, bias=bias)
        self.v_proj = nn.Linear(D, Hkv * hd, bias=bias)
        self.o_proj = nn.Linear(H * hd, D, bias=bias)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
        )  # (B, H, S, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekMoEConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp: nn.Module = (
            DeepseekMoE(config, layer_idx)
            if self.is_moe
            else SwiGLU(config.hidden_size, config.intermediate_size)
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[MoEAux]]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, aux = self.mlp(h, input_ids)
            return x + y, aux
        return x + self.mlp(h), None


class DeepseekModel(nn.Module):
    def __init__(self, config: DeepseekMoEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class CausalLMOutput:
    """Model output. Per-layer tensors are stacked over the MoE layers, in layer order."""

    logits: torch.Tensor  # (B, S, V)
    loss: Optional[torch.Tensor] = None  # lm_loss + alpha_1 * sum(expert) + alpha_2 * sum(device)
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None  # the weighted balance-loss term alone
    expert_balance_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [L_moe]
    device_balance_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [L_moe]
    tokens_per_expert: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # [L_moe, E]
    dropped_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [L_moe]


class DeepseekForCausalLM(nn.Module):
    def __init__(self, config: DeepseekMoEConfig):
        super().__init__()
        self.config = config
        self.model = DeepseekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: Optional[float] = None) -> None:
        """Normal(0, std) for every matrix (std = ``initializer_range``, 0.006); norms to 1."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
    ) -> CausalLMOutput:
        """``input_ids`` (B, S) -> logits (B, S, V); with ``labels`` (B, S), the shifted LM loss
        (next-token, ``-100`` ignored) plus the weighted balance losses."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        cfg = self.config
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= cfg.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is out of range for vocab_size {cfg.vocab_size}")
        if S > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {S} exceeds max_position_embeddings {cfg.max_position_embeddings}"
            )
        x = self.model.embed_tokens(input_ids)
        positions = torch.arange(S, device=input_ids.device)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        auxes: list[MoEAux] = []
        for layer in self.model.layers:
            x, aux = layer(x, cos, sin, input_ids)
            if aux is not None:
                auxes.append(aux)
        logits = self.lm_head(self.model.norm(x))
        out = CausalLMOutput(logits=logits)
        device = input_ids.device
        if auxes:
            out.expert_balance_loss = torch.stack([a.expert_balance_loss for a in auxes])
            out.device_balance_loss = torch.stack([a.device_balance_loss for a in auxes])
            out.tokens_per_expert = torch.stack([a.tokens_per_expert for a in auxes])
            out.dropped_tokens = torch.stack([a.dropped_tokens for a in auxes])
        else:
            out.expert_balance_loss = torch.zeros(0, device=device)
            out.device_balance_loss = torch.zeros(0, device=device)
            out.tokens_per_expert = torch.zeros(0, cfg.n_routed_experts, dtype=torch.long, device=device)
            out.dropped_tokens = torch.zeros(0, dtype=torch.long, device=device)
        out.aux_loss = (
            cfg.aux_loss_alpha * out.expert_balance_loss.sum()
            + cfg.device_aux_loss_alpha * out.device_balance_loss.sum()
        )
        if labels is not None:
            out.lm_loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
            out.loss = out.lm_loss + out.aux_loss
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
