"""Config validation and the HuggingFace config.json field names."""

from __future__ import annotations

import json

import pytest

from deepseek_moe.config import DeepseekMoEConfig
from deepseek_moe.presets import get_config, preset_names


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(num_experts_per_tok=65), "num_experts_per_tok"),
        (dict(num_attention_heads=15), "num_attention_heads"),
        (dict(hidden_size=-8), "hidden_size"),
        (dict(moe_intermediate_size=-1), "moe_intermediate_size"),
        (dict(n_routed_experts=-2), "n_routed_experts"),
        (dict(router="expert-choice"), "router"),
        (dict(n_device_groups=3), "n_device_groups"),
        (dict(router="hash", num_experts_per_tok=2), "num_experts_per_tok"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(scoring_func="sigmoid"), "scoring_func"),
        (dict(dispatch="magic"), "dispatch"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(vocab_size=1.5), "vocab_size"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        get_config("deepseekmoe-16b", **overrides)


def test_unknown_override_is_an_error():
    with pytest.raises(ValueError, match="unknown config field"):
        get_config("tiny", n_experts=8)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="deepseekmoe-16b"):
        get_config("deepseekmoe-17b")


def test_released_16b_config_matches_preset():
    """The config.json fields of the released deepseek-moe-16b checkpoint give exactly the 16B preset."""
    released = dict(
        model_type="deepseek", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False, scoring_func="softmax",
        aux_loss_alpha=0.001, seq_aux=True, hidden_act="silu", max_position_embeddings=4096,
        rms_norm_eps=1e-6, rope_theta=10000, tie_word_embeddings=False, bos_token_id=100000,
        eos_token_id=100001, torch_dtype="bfloat16", auto_map={"AutoConfig": "x"},
    )
    cfg = DeepseekMoEConfig.from_hf_dict(released)
    preset = get_config("deepseekmoe-16b")
    assert cfg.replace(name=preset.name) == preset
    assert cfg.moe_layers == list(range(1, 28))


def test_hf_dict_round_trip(tmp_path):
    for name in ("deepseekmoe-145b", "hash-tiny", "gshard-x1.5-2b", "dense-tiny"):
        cfg = get_config(name, capacity_factor=1.25 if "gshard" in name else None)
        path = tmp_path / "config.json"
        cfg.save(path)
        d = json.loads(path.read_text())
        assert d["model_type"] == "deepseek"
        assert DeepseekMoEConfig.load(path) == cfg.replace(dispatch="fast")


def test_wrong_model_type_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        DeepseekMoEConfig.from_hf_dict({"model_type": "llama"})
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DeepseekMoEConfig.load(p)


def test_moe_layer_rule():
    cfg = get_config("tiny", num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    assert cfg.moe_layers == [2, 4]
    assert get_config("dense-tiny").moe_layers == []
    assert not get_config("dense-x16-2b").has_moe


def test_every_preset_builds():
    for name in preset_names():
        cfg = get_config(name)
        assert cfg.num_experts_per_tok <= max(cfg.n_routed_experts, 0) or not cfg.has_moe
