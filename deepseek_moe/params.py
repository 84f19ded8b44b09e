"""Parameter and FLOP accounting, read off the real module tree (built on the meta device).

Activated parameters count everything a token touches: embeddings and LM head, attention, norms,
dense FFNs, routers, shared experts, and ``top_k / n_routed`` of the routed experts. This is the
convention under which the paper's 16B model has 2.8B activated parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import DeepseekMoEConfig
from .model import DeepseekForCausalLM

CATEGORIES = ("embedding", "lm_head", "attention", "norm", "dense_ffn", "router", "shared_experts",
              "routed_experts")


def _category(name: str) -> str:
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in name:
        return "attention"
    if "norm" in name:
        return "norm"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate.weight" in name:
        return "router"
    if ".mlp." in name:
        return "dense_ffn"
    raise ValueError(f"unclassified parameter {name}")


@dataclass
class ParamReport:
    config: DeepseekMoEConfig
    total_by_category: dict[str, int]
    active_by_category: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.total_by_category.values())

    @property
    def active(self) -> int:
        return sum(self.active_by_category.values())

    @property
    def expert_params(self) -> int:
        """Parameters in FFN experts (shared + routed), or the dense FFNs of a dense model."""
        c = self.total_by_category
        return c["shared_experts"] + c["routed_experts"] + (0 if self.config.has_moe else c["dense_ffn"])

    def flops_per_token(self, seq_len: Optional[int] = None) -> dict[str, float]:
        """Forward and training (forward + backward) FLOPs per token at ``seq_len``.

        Matmuls: 2 FLOPs per activated weight (the input embedding is a lookup, not a matmul).
        Attention scores and values: 4 * S * D per layer forward, as in DeepSeek LLM's
        ``M = 72 L D^2 + 12 L D S`` (no causal halving). Training = 3 x forward.
        """
        cfg = self.config
        S = cfg.max_position_embeddings if seq_len is None else seq_len
        matmul_params = self.active - self.active_by_category["embedding"] - self.active_by_category["norm"]
        attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * S
        forward = 2 * matmul_params + attn
        return {"forward": float(forward), "train": float(3 * forward), "seq_len": float(S)}


def count_parameters(config: DeepseekMoEConfig) -> ParamReport:
    """Build ``config`` on the meta device (no memory) and count its parameters by category."""
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    total = dict.fromkeys(CATEGORIES, 0)
    active = dict.fromkeys(CATEGORIES, 0)
    frac = (
        config.num_experts_per_tok / config.n_routed_experts if config.n_routed_experts else 0.0
    )
    for name, p in model.named_parameters():
        cat = _category(name)
        total[cat] += p.numel()
        active[cat] += round(p.numel() * frac) if cat == "routed_experts" else p.numel()
    return ParamReport(config, total, active)


def format_report(report: ParamReport, seq_len: Optional[int] = None) -> str:
    """A readable table of the report."""
    cfg = report.config
    lines = [f"preset: {cfg.name or '(custom)'}"]
    if cfg.has_moe:
        lines.append(
            f"experts per MoE layer: {cfg.n_shared_experts} shared + {cfg.n_routed_experts} routed "
            f"(top-{cfg.num_experts_per_tok}), expert width {cfg.moe_intermediate_size}, "
            f"router {cfg.router}, MoE layers {len(cfg.moe_layers)}/{cfg.num_hidden_layers}"
        )
    else:
        lines.append(f"dense: FFN width {cfg.intermediate_size}, {cfg.num_hidden_layers} layers")
    lines.append(f"{'component':<16}{'total':>18}{'activated':>18}")
    for cat in CATEGORIES:
        t, a = report.total_by_category[cat], report.active_by_category[cat]
        if t:
            lines.append(f"{cat:<16}{t:>18,}{a:>18,}")
    lines.append(f"{'TOTAL':<16}{report.total:>18,}{report.active:>18,}")
    lines.append(f"{'':<16}{human(report.total):>18}{human(report.active):>18}")
    lines.append(f"FFN expert parameters: {human(report.expert_params)}")
    fl = report.flops_per_token(seq_len)
    S = int(fl["seq_len"])
    lines.append(
        f"FLOPs per token at seq {S}: forward {human(fl['forward'], 'FLOP')}, "
        f"training {human(fl['train'], 'FLOP')} ({human(fl['train'] * 4096, 'FLOP')} per 4K tokens)"
    )
    return "\n".join(lines)


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"
