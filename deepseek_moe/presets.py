"""Named presets: the paper's models, its baselines and ablations, and tiny CPU counterparts.

Sources (Dai et al. 2024, arXiv 2401.06066):
- ``deepseekmoe-2b``: Appendix A / Table 7, the 2B validation model (Table 1 row "DeepSeekMoE").
- ``deepseekmoe-16b``: Table 7 and the released deepseek-moe-16b-base ``config.json``.
- ``deepseekmoe-145b``: Table 7 (4 shared + 128 routed, top-12, expert = 0.125 standard FFN).
- 2B-scale baselines (Table 1, Table 2) and ablations (Fig. 3, shared ratio, Fig. 6): Section 4.

Every 2B-scale MoE holds 16x the parameters of a standard FFN in its experts and activates 2x
(Hash and Switch: 1x). A standard FFN is SwiGLU with intermediate ~8/3 of hidden: 3424 at hidden
1280 (8/3 * 1280 = 3413, rounded up to a multiple of 16 so that 1/4, 1/2 and 3/2 of it are
integers). The ``-tiny`` presets keep every ratio at hidden 128 (standard FFN 352) for CPU runs.
"""

from __future__ import annotations

from typing import Any, Callable

from .config import DeepseekMoEConfig

# name -> (description, factory)
_REGISTRY: dict[str, tuple[str, Callable[[], DeepseekMoEConfig]]] = {}


def _register(name: str, description: str, **fields: Any) -> None:
    def make() -> DeepseekMoEConfig:
        return DeepseekMoEConfig(name=name, **fields)

    _REGISTRY[name] = (description, make)


# --- the paper's DeepSeekMoE models --------------------------------------------------------------
_register(
    "deepseekmoe-16b",
    "DeepSeekMoE 16B: 2 shared + 64 routed (top-6), layer 0 dense (Table 7, released config)",
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=28,
    num_attention_heads=16,
    n_shared_experts=2,
    n_routed_experts=64,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    aux_loss_alpha=0.001,
    max_position_embeddings=4096,
)
_register(
    "deepseekmoe-145b",
    "DeepSeekMoE 145B: 4 shared + 128 routed (top-12) of 0.125 FFN, layer 0 dense (Table 7)",
    vocab_size=102400,
    hidden_size=4096,
    # Table 7 does not give the dense layer's width; matching the activated FFN width of an MoE
    # layer (16 x 1408) reproduces the published 144.6B total / 22.2B activated.
    intermediate_size=16 * 1408,
    moe_intermediate_size=1408,  # 0.125 x 10944 (8/3 x 4096 aligned to 64), aligned to 64
    num_hidden_layers=62,
    num_attention_heads=32,
    n_shared_experts=4,
    n_routed_experts=128,
    num_experts_per_tok=12,
    first_k_dense_replace=1,
    aux_loss_alpha=0.003,
    device_aux_loss_alpha=0.05,
    n_device_groups=8,
    max_position_embeddings=4096,
)

# --- the 2B-scale family (Table 1, Table 2, Fig. 3, shared ratio, Fig. 6) -------------------------
_SCALES = {
    "2b": dict(hidden=1280, layers=9, heads=10, ffn=3424, vocab=8192, ctx=2048),
    "tiny": dict(hidden=128, layers=4, heads=4, ffn=352, vocab=8192, ctx=1024),
}

# family name: (description, shared, routed, top-k, expert size vs standard FFN, extra fields)
_FAMILY: dict[str, tuple[str, int, int, int, float, dict[str, Any]]] = {
    "deepseekmoe": ("DeepSeekMoE 1 + 7/63, experts 0.25 FFN", 1, 63, 7, 0.25, {}),
    "dense": ("Dense: one standard FFN per layer", 0, 0, 0, 1.0, {}),
    "hash": ("Hash Layer: 16 experts, fixed hash of the token id", 0, 16, 1, 1.0,
             {"router": "hash"}),
    "switch": ("Switch Transformer: 16 experts, learned top-1", 0, 16, 1, 1.0, {}),
    "gshard": ("GShard: 16 experts, learned top-2 (= Fig. 3 step 0 + 2/16)", 0, 16, 2, 1.0,
               {"norm_topk_prob": True}),
    "gshard-x1.5": ("GShard x1.5: 16 experts of 1.5 FFN, top-2 (Table 2)", 0, 16, 2, 1.5,
                    {"norm_topk_prob": True}),
    "dense-x16": ("Dense x16: 16 always-on FFNs = one FFN of 16x width (Table 2)", 0, 0, 0,
                  16.0, {}),
    "moe-1+1of15": ("Fig. 3 ablation: shared-expert isolation, 1 + 1/15, experts 1 FFN", 1, 15,
                    1, 1.0, {}),
    "moe-1+3of31": ("Fig. 3 ablation: finer segmentation, 1 + 3/31, experts 0.5 FFN", 1, 31, 3,
                    0.5, {}),
    "moe-2+6of62": ("Shared-ratio variant: 2 shared + 6/62 routed, experts 0.25 FFN", 2, 62, 6,
                    0.25, {}),
    "moe-4+4of60": ("Shared-ratio variant: 4 shared + 4/60 routed, experts 0.25 FFN", 4, 60, 4,
                    0.25, {}),
    "moe-1+3of63": ("Half-activated DeepSeekMoE 1 + 3/63, experts 0.25 FFN (Fig. 6)", 1, 63, 3,
                    0.25, {}),
}
# Aliases naming the Fig. 3 end points by their expert counts.
_ALIASES = {"moe-0+2of16": "gshard", "moe-1+7of63": "deepseekmoe"}

for _scale, _s in _SCALES.items():
    for _fam, (_desc, _shared, _routed, _k, _size, _extra) in _FAMILY.items():
        _ffn = _s["ffn"]
        _dense = _routed == 0
        _register(
            f"{_fam}-{_scale}",
            f"{_desc} [{_scale} scale]",
            vocab_size=_s["vocab"],
            hidden_size=_s["hidden"],
            intermediate_size=round(_ffn * _size) if _dense else _ffn,
            moe_intermediate_size=0 if _dense else round(_ffn * _size),
            num_hidden_layers=_s["layers"],
            num_attention_heads=_s["heads"],
            n_shared_experts=_shared,
            n_routed_experts=_routed,
            num_experts_per_tok=_k,
            first_k_dense_replace=0,  # the 2B validation models use MoE in every layer
            aux_loss_alpha=0.0 if (_dense or _extra.get("router") == "hash") else 0.01,
            max_position_embeddings=_s["ctx"],
            bos_token_id=None,
            eos_token_id=None,
            **_extra,
        )
    for _alias, _target in _ALIASES.items():
        _REGISTRY[f"{_alias}-{_scale}"] = (
            f"alias of {_target}-{_scale}",
            _REGISTRY[f"{_target}-{_scale}"][1],
        )

# Short names.
for _short, _full in {"2b": "deepseekmoe-2b", "16b": "deepseekmoe-16b", "145b": "deepseekmoe-145b",
                      "tiny": "deepseekmoe-tiny"}.items():
    _REGISTRY[_short] = (f"alias of {_full}", _REGISTRY[_full][1])


def preset_names(include_aliases: bool = True) -> list[str]:
    if include_aliases:
        return list(_REGISTRY)
    return [n for n, (d, _) in _REGISTRY.items() if not d.startswith("alias of")]


def preset_description(name: str) -> str:
    return _REGISTRY[_canonical(name)][0]


def _canonical(name: str) -> str:
    if name not in _REGISTRY:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    return name


def get_config(name: str, **overrides: Any) -> DeepseekMoEConfig:
    """The preset ``name`` with fields overridden, e.g. ``get_config("tiny", vocab_size=4096)``."""
    cfg = _REGISTRY[_canonical(name)][1]()
    return cfg.replace(**overrides) if overrides else cfg
