"""The qwen2_moe export: stock transformers (no remote code) computes what we compute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepseek_moe.checkpoint import CheckpointError, save_pretrained
from deepseek_moe.generate import generate
from deepseek_moe.hf_export import export_qwen2_moe
from deepseek_moe.model import DeepseekForCausalLM
from deepseek_moe.presets import get_config
from deepseek_moe.runs import load_checkpoint

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
# A dense first layer and 2 shared experts: every part of the mapping.
SMALL = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
             num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=96, moe_intermediate_size=24,
             n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=3)


def hf_model(path: Path):
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # no trust_remote_code
    assert type(m).__name__ == "Qwen2MoeForCausalLM"
    return m.eval()


def assert_same_function(ours: DeepseekForCausalLM, theirs, vocab: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (2, 40), generator=g)
    with torch.no_grad():
        a = ours(x).logits
        b = theirs(x).logits
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5
    prompt = x[0, :10]
    with torch.no_grad():
        mine = generate(ours, [prompt.tolist()], 12, greedy=True)[0]
        hf = theirs.generate(prompt[None], max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, 10:].tolist()
    assert mine == hf


@pytest.mark.parametrize("shared", [2, 0])
def test_random_model_exports_exactly(tmp_path, shared):
    torch.manual_seed(0)
    model = DeepseekForCausalLM(get_config("deepseekmoe-tiny", **{**SMALL, "n_shared_experts": shared})).eval()
    with torch.no_grad():  # not the 0.006 init: logits large enough to compare
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    out = export_qwen2_moe(model, tmp_path / "qwen")
    assert_same_function(model, hf_model(out), SMALL["vocab_size"])


def test_trained_run_exports_exactly(run, tmp_path):
    """The conftest's trained run through the command, tokenizer included."""
    out = tmp_path / "qwen"
    r = subprocess.run([sys.executable, "-m", "deepseek_moe", "export", str(run), str(out), "--format", "qwen2_moe"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (out / "tokenizer.json").is_file()
    ours, tok, _, _ = load_checkpoint(run)
    assert_same_function(ours, hf_model(out), ours.config.vocab_size)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert fast("def main():")["input_ids"] == tok.encode("def main():").ids


@pytest.mark.parametrize("overrides, why", [
    (dict(router="hash", n_shared_experts=0, num_experts_per_tok=1), "hashing the token id"),
    (dict(capacity_factor=1.25), "capacity factor of 1.25"),
    (dict(routed_scaling_factor=9.0), "routed_scaling_factor=9"),
])
def test_what_qwen2_moe_cannot_express_is_refused(tmp_path, overrides, why):
    model = DeepseekForCausalLM(get_config("deepseekmoe-tiny", **{**SMALL, **overrides}))
    with pytest.raises(CheckpointError, match=f"cannot export .* as qwen2_moe: .*{why}"):
        export_qwen2_moe(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    dense = DeepseekForCausalLM(get_config("dense-tiny", vocab_size=512, num_hidden_layers=1))
    save_pretrained(dense, tmp_path / "dense")
    r = subprocess.run([sys.executable, "-m", "deepseek_moe", "export", str(tmp_path / "dense"), str(tmp_path / "q"),
                        "--format", "qwen2_moe"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "dense model" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_merged_lora_model_exports_exactly(tmp_path):
    """A LoRA-adapted model (adapters on attention and every expert), merged, exports to transformers."""
    from deepseek_moe.lora import LoRAConfig, add_lora, lora_modules, merge

    torch.manual_seed(1)
    model = DeepseekForCausalLM(get_config("deepseekmoe-tiny", **SMALL)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    add_lora(model, LoRAConfig(4, 8.0))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.B.normal_(0, 0.05)  # as after training
    adapted = model(torch.arange(20)[None]).logits
    merge(model)
    assert (model(torch.arange(20)[None]).logits - adapted).abs().max() <= 1e-5 * adapted.abs().max()
    out = export_qwen2_moe(model, tmp_path / "qwen")
    assert_same_function(model, hf_model(out), SMALL["vocab_size"])
