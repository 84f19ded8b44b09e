"""A native transformers export: DeepSeekMoE written as a Qwen2-MoE checkpoint.

transformers has no model class for DeepSeek v1 (its ``deepseek_v2`` / ``v3`` use MLA attention and
cannot hold v1 weights), but Qwen2-MoE computes the same function once mapped:

- routed experts: the same softmax top-k router (eq. 10-11; ``norm_topk_prob`` carried over) and
  the same SwiGLU experts, per-expert tensors under the same names;
- shared experts (eq. 9's always-on part): Qwen2-MoE's one shared MLP of width
  ``n_shared_experts x moe_intermediate_size`` (the released checkpoint stores them fused so),
  whose output Qwen2-MoE scales by ``sigmoid(shared_expert_gate(x))``: the gate is written as
  zeros (sigmoid 0 = 0.5) and the shared down projection doubled, exactly (x2 then x0.5); a model
  without shared experts gets a zero shared MLP, which adds exactly 0;
- attention: Qwen2-MoE has q/k/v biases; they are written as zeros;
- dense layers (``first_k_dense_replace``, ``moe_layer_freq``) are ``mlp_only_layers`` with
  ``intermediate_size``.

What Qwen2-MoE cannot express is refused with the reason: hash routing (a fixed function of the
token id, no router), a capacity factor (Qwen2-MoE is dropless) and a dense model (no MoE
layer). Because vLLM, SGLang, llama.cpp's converter and PEFT read Qwen2-MoE, stock tools load the
result with no remote code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch

from .atomic import write_json
from .checkpoint import CheckpointError, copy_companions, hf_state_dict, new_checkpoint_dir, write_shards
from .config import DeepseekMoEConfig
from .memory import parse_size
from .model import DeepseekForCausalLM
from .quant import quantized_layers

FORMATS = ("released", "qwen2_moe")


def qwen2_moe_refusal(cfg: DeepseekMoEConfig) -> Union[str, None]:
    """Why ``cfg`` cannot be written as Qwen2-MoE (None: it can)."""
    if not cfg.has_moe:
        return "it is a dense model (no MoE layer): Qwen2-MoE needs one"
    if cfg.router == "hash":
        return "it routes by hashing the token id (Hash Layer), which Qwen2-MoE's learned router cannot express"
    if cfg.capacity_factor is not None:
        return (f"it drops tokens over a capacity factor of {cfg.capacity_factor}, and Qwen2-MoE is "
                "dropless")
    if cfg.scoring_func != "softmax":
        return f"its scoring function {cfg.scoring_func!r} is not Qwen2-MoE's softmax"
    if cfg.routed_scaling_factor != 1:
        return (f"it scales its routed gates by routed_scaling_factor={cfg.routed_scaling_factor:g}, "
                "which Qwen2-MoE cannot express")
    return None


def qwen2_moe_config(cfg: DeepseekMoEConfig, dtype: torch.dtype) -> dict[str, Any]:
    shared = max(cfg.n_shared_experts, 1) * cfg.moe_intermediate_size
    return {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "moe_intermediate_size": cfg.moe_intermediate_size,
        "shared_expert_intermediate_size": shared, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "hidden_act": cfg.hidden_act, "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings, "use_sliding_window": False,
        "attention_dropout": 0.0, "qkv_bias": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)],
        "num_experts": cfg.n_routed_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
        "norm_topk_prob": cfg.norm_topk_prob, "router_aux_loss_coef": cfg.aux_loss_alpha,
        "initializer_range": cfg.initializer_range, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def qwen2_moe_tensors(model: DeepseekForCausalLM) -> list[tuple[str, torch.Tensor]]:
    """The model's tensors under Qwen2-MoE's names (views where nothing changes)."""
    cfg = model.config
    out: list[tuple[str, torch.Tensor]] = []
    for name, t in hf_state_dict(model).items():
        if ".mlp.shared_experts." in name:
            name = name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
            if name.endswith("down_proj.weight"):
                t = t * 2  # Qwen2-MoE halves it: sigmoid(0) = 0.5
        out.append((name, t))
        if name.endswith("self_attn.v_proj.weight"):
            prefix = name[: -len("v_proj.weight")]
            for proj, rows in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads),
                               ("v_proj", cfg.num_key_value_heads)):
                out.append((f"{prefix}{proj}.bias", t.new_zeros(rows * cfg.head_dim)))
    ref = model.lm_head.weight.detach()  # the dtype and device of the new zeros
    for i in range(cfg.num_hidden_layers):
        if not cfg.is_moe_layer(i):
            continue
        out.append((f"model.layers.{i}.mlp.shared_expert_gate.weight", ref.new_zeros(1, cfg.hidden_size)))
        if cfg.n_shared_experts == 0:  # a shared MLP that adds exactly 0
            I, D = cfg.moe_intermediate_size, cfg.hidden_size
            for proj, shape in (("gate_proj", (I, D)), ("up_proj", (I, D)), ("down_proj", (D, I))):
                out.append((f"model.layers.{i}.mlp.shared_expert.{proj}.weight", ref.new_zeros(shape)))
    return out


def export_qwen2_moe(model: DeepseekForCausalLM, out: Path, tokenizer_dir: Union[Path, None] = None,
                     max_shard_size: Union[int, str] = "5GB") -> Path:
    """Write ``model`` as a Qwen2-MoE checkpoint in ``out`` (atomically; the caller checks ``out``),
    with the tokenizer files found in ``tokenizer_dir``."""
    why = qwen2_moe_refusal(model.config)
    if quantized_layers(model):
        why = "it is quantized; export the checkpoint it was quantized from"
    if why is not None:
        raise CheckpointError(f"cannot export {model.config.name or 'this model'} as qwen2_moe: {why}")
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    with new_checkpoint_dir(Path(out)) as tmp:
        write_shards(tmp, qwen2_moe_tensors(model), parse_size(max_shard_size, "max_shard_size"))
        write_json(tmp / "config.json", qwen2_moe_config(model.config, dtype))
        if tokenizer_dir is not None:
            copy_companions(tokenizer_dir, tmp)
    return Path(out)
