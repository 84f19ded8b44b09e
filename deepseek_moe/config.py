"""Typed model configuration.

Field names follow the ``config.json`` of the released deepseek-moe-16b checkpoint, so a config
round-trips through the HuggingFace layout unchanged. The extra fields below the marked line are
what the paper's baselines need (router kind, capacity factor, device-level loss); they are written
to ``config.json`` too and ignored by other readers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

ROUTERS = ("softmax_topk", "hash")
SCORING_FUNCS = ("softmax",)
HIDDEN_ACTS = ("silu",)


@dataclass
class DeepseekMoEConfig:
    """Configuration of a DeepSeekMoE causal LM (and of every baseline of the paper).

    A layer ``i`` is an MoE layer when ``n_routed_experts > 0`` and
    ``i >= first_k_dense_replace and i % moe_layer_freq == 0``; otherwise it is a dense SwiGLU FFN
    of ``intermediate_size``. ``n_routed_experts == 0`` gives a dense model.
    """

    # --- fields of the released config.json --------------------------------------------------
    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: Optional[int] = None  # None -> num_attention_heads (plain MHA)
    n_shared_experts: int = 2
    n_routed_experts: int = 64
    num_experts_per_tok: int = 6  # routed experts per token (mK - Ks in the paper's notation)
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001  # alpha_1, expert-level balance (eq. 12)
    seq_aux: bool = True  # eq. 12-14 per sequence, averaged over the batch
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006
    bos_token_id: Optional[int] = 100000
    eos_token_id: Optional[int] = 100001
    attention_bias: bool = False
    # --- extensions for the paper's baselines and ablations ----------------------------------
    router: str = "softmax_topk"  # "softmax_topk" (DeepSeekMoE, Switch, GShard) or "hash"
    capacity_factor: Optional[float] = None  # None = dropless; else GShard/Switch capacity
    device_aux_loss_alpha: float = 0.0  # alpha_2, device-level balance (eq. 15)
    n_device_groups: int = 1  # D: routed experts split into D contiguous groups (eq. 15-17)
    dispatch: str = "fast"  # "fast" (sorted grouped GEMM) or "reference" (per-expert loop)
    # Multiplies the routed experts' gates (eq. 9's g_i,t; DeepSeek-V2's field of this name). 1 is
    # DeepSeekMoE as published: raw softmax gates sum to about K/E at the start, against the
    # shared experts' implicit gate of 1. A control for the learning-rate study (README).
    routed_scaling_factor: float = 1.0
    name: str = ""  # preset name, informational

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    # ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field for any invalid combination."""

        def bad(field_name: str, why: str) -> None:
            raise ValueError(f"invalid config field '{field_name}': {why}")

        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "moe_layer_freq",
            "n_device_groups",
        )
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, f"must be a positive integer, got {v!r}")
        non_negative = (
            "intermediate_size",
            "moe_intermediate_size",
            "n_shared_experts",
            "n_routed_experts",
            "num_experts_per_tok",
            "first_k_dense_replace",
        )
        for name in non_negative:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, f"must be a non-negative integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            bad(
                "num_attention_heads",
                f"{self.num_attention_heads} heads do not divide hidden_size {self.hidden_size}",
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            bad("num_attention_heads", "head dimension must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            bad(
                "num_key_value_heads",
                f"{self.num_key_value_heads} must divide num_attention_heads "
                f"{self.num_attention_heads}",
            )
        if self.router not in ROUTERS:
            bad("router", f"unknown router {self.router!r}; choose one of {ROUTERS}")
        if self.scoring_func not in SCORING_FUNCS:
            bad("scoring_func", f"unknown scoring function {self.scoring_func!r}")
        if self.hidden_act not in HIDDEN_ACTS:
            bad("hidden_act", f"unknown activation {self.hidden_act!r}")
        if self.dispatch not in ("fast", "reference"):
            bad("dispatch", f"must be 'fast' or 'reference', got {self.dispatch!r}")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", "must be > 0")
        if self.rope_theta <= 0:
            bad("rope_theta", "must be > 0")
        if self.initializer_range < 0:
            bad("initializer_range", "must be >= 0")
        if self.aux_loss_alpha < 0:
            bad("aux_loss_alpha", "must be >= 0")
        if self.device_aux_loss_alpha < 0:
            bad("device_aux_loss_alpha", "must be >= 0")
        if not (isinstance(self.routed_scaling_factor, (int, float)) and self.routed_scaling_factor > 0):
            bad("routed_scaling_factor", f"must be > 0, got {self.routed_scaling_factor!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            bad("capacity_factor", f"must be > 0 or None (dropless), got {self.capacity_factor}")
        if self.has_moe:
            if self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size", "must be > 0 in a model with MoE layers")
            if self.num_experts_per_tok < 1:
                bad("num_experts_per_tok", "an MoE layer must activate at least one routed expert")
            if self.num_experts_per_tok > self.n_routed_experts:
                bad(
                    "num_experts_per_tok",
                    f"top-{self.num_experts_per_tok} exceeds the {self.n_routed_experts} "
                    "routed experts",
                )
            if self.router == "hash" and self.num_experts_per_tok != 1:
                bad("num_experts_per_tok", "the hash router sends each token to exactly 1 expert")
            if self.n_routed_experts % self.n_device_groups:
                bad(
                    "n_device_groups",
                    f"{self.n_device_groups} groups do not divide {self.n_routed_experts} "
                    "routed experts",
                )
        if any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            if self.intermediate_size <= 0:
                bad("intermediate_size", "must be > 0 when the model has dense FFN layers")

    # ---------------------------------------------------------------------------------------
    @property
    def has_moe(self) -> bool:
        return self.n_routed_experts > 0 and any(
            self.is_moe_layer(i) for i in range(self.num_hidden_layers)
        )

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.n_routed_experts > 0
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def replace(self, **overrides: Any) -> "DeepseekMoEConfig":
        """A copy with fields replaced (validated)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown config field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    # --- HuggingFace config.json ---------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("dispatch")  # a runtime choice, not a property of the weights
        d.update(
            model_type="deepseek",
            architectures=["DeepseekForCausalLM"],
            pretraining_tp=1,
            use_cache=True,
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "DeepseekMoEConfig":
        if d.get("model_type", "deepseek") != "deepseek":
            raise ValueError(
                f"config.json has model_type {d.get('model_type')!r}; expected 'deepseek'"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        # The release writes null for n_routed_experts in dense models.
        for k in ("n_routed_experts", "n_shared_experts"):
            if k in kwargs and kwargs[k] is None:
                kwargs[k] = 0
        if d.get("scoring_func", "softmax") != "softmax":
            raise ValueError(f"unsupported scoring_func {d['scoring_func']!r}")
        # Other keys of a hub config.json (architectures, auto_map, torch_dtype, ...) describe the
        # files, not the model, and are ignored; a RoPE scaling would change the model silently.
        if d.get("rope_scaling") is not None:
            raise ValueError(f"unsupported rope_scaling {d['rope_scaling']!r} (plain RoPE only)")
        return cls(**kwargs)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DeepseekMoEConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d)


__all__ = ["DeepseekMoEConfig", "ROUTERS"]
