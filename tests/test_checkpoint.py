"""The released checkpoint layout: exact names, bit-exact round trips, sharding, atomic saves and
clear errors for every kind of broken checkpoint. Tiny configs, CPU only."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deepseek_moe import checkpoint as ckpt
from deepseek_moe.checkpoint import (
    CheckpointError, from_hf_state_dict, hf_state_dict, load_pretrained, parse_size,
    save_pretrained,
)
from deepseek_moe.model import DeepseekForCausalLM
from deepseek_moe.presets import get_config

SMALL = dict(vocab_size=512, num_hidden_layers=3)
CONFIGS = {
    # layer 0 dense, layers 1-2 MoE (1 shared + 8 routed, top-2)
    "moe": get_config("tiny", **SMALL, first_k_dense_replace=1, n_routed_experts=8,
                      num_experts_per_tok=2),
    "hash": get_config("hash-tiny", **SMALL, n_routed_experts=4, moe_intermediate_size=64),
    "dense": get_config("dense-tiny", **SMALL),
    "no-shared": get_config("tiny", **SMALL, first_k_dense_replace=1, n_routed_experts=8,
                            num_experts_per_tok=2, n_shared_experts=0),
    "tied": get_config("tiny", **SMALL, first_k_dense_replace=1, n_routed_experts=4,
                       num_experts_per_tok=2, tie_word_embeddings=True),
}


def make_model(name: str = "moe", seed: int = 0) -> DeepseekForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(CONFIGS[name])
    with torch.no_grad():  # every tensor random (norms too), so a swapped key cannot go unseen
        for p in model.parameters():
            p.normal_()
    return model


def ids(vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(1))


def assert_same(a: DeepseekForCausalLM, b: DeepseekForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def rewrite(path, edit) -> None:
    """Apply ``edit`` to the tensors of a single-file checkpoint."""
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_bit_exact(tmp_path, name):
    model = make_model(name)
    save_pretrained(model, tmp_path / "ck")
    loaded = load_pretrained(tmp_path / "ck")
    assert_same(model, loaded)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, loaded(ids()).logits)
    if CONFIGS[name].tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_names_are_the_released_ones(tmp_path):
    cfg = CONFIGS["moe"]
    save_pretrained(make_model(), tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    want = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        want |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        want |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        if i == 0:
            want |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
            continue
        want.add(p + "mlp.gate.weight")
        want |= {p + f"mlp.shared_experts.{x}_proj.weight" for x in ("gate", "up", "down")}
        want |= {p + f"mlp.experts.{e}.{x}_proj.weight" for e in range(8)
                 for x in ("gate", "up", "down")}
    assert names == want
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == "deepseek" and hf["torch_dtype"] == "float32"
    for field in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "n_shared_experts", "n_routed_experts", "num_experts_per_tok",
                  "first_k_dense_replace", "moe_layer_freq", "norm_topk_prob", "scoring_func",
                  "aux_loss_alpha", "seq_aux", "hidden_act", "max_position_embeddings",
                  "rms_norm_eps", "rope_theta", "tie_word_embeddings", "bos_token_id",
                  "eos_token_id"):
        assert hf[field] == getattr(cfg, field), field


def test_expert_slices_and_hf_state_dict_round_trip():
    model = make_model()
    hf = hf_state_dict(model)
    w2 = model.model.layers[1].mlp.experts.w2  # [E, D, I]
    assert torch.equal(hf["model.layers.1.mlp.experts.5.down_proj.weight"], w2[5])
    assert hf["model.layers.1.mlp.experts.5.down_proj.weight"].data_ptr() == w2[5].data_ptr()
    ours = from_hf_state_dict(hf, CONFIGS["moe"])
    sd = model.state_dict()
    assert ours.keys() == sd.keys() and all(torch.equal(ours[k], sd[k]) for k in sd)
    tied = make_model("tied")
    assert "lm_head.weight" not in hf_state_dict(tied)


def test_sharded_save(tmp_path):
    model = make_model()
    save_pretrained(model, tmp_path, max_shard_size="300KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    total = 0
    for shard in shards:
        with safe_open(tmp_path / shard, framework="pt") as f:
            for n in f.keys():
                assert index["weight_map"][n] == shard
                total += f.get_tensor(n).nbytes
    assert set(index["weight_map"].values()) == set(shards)
    assert len(index["weight_map"]) == len(hf_state_dict(model))
    assert index["metadata"]["total_size"] == total
    assert_same(model, load_pretrained(tmp_path))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("200MB") == 200 * 10**6
    assert parse_size("10KB") == 10_000 and parse_size("2MiB") == 2**21 and parse_size(77) == 77
    for bad in ("lots", "0", -1):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_dtype_and_assign(tmp_path):
    model = make_model()
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, dispatch="reference")
    assert loaded.config.dispatch == "reference"
    params = dict(loaded.named_parameters())
    assert not any(p.is_meta for p in params.values())
    ptrs = [p.data_ptr() for p in params.values()]
    assert len(set(ptrs)) == len(ptrs)  # every tensor its own storage, experts stacked once each
    stacks = [loaded.model.layers[i].mlp.experts for i in (1, 2)]
    assert all(s.w1.is_contiguous() and s.w1.shape == (8, 88, 128) for s in stacks)
    bf = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    w2 = model.model.layers[2].mlp.experts.w2
    assert torch.equal(bf.model.layers[2].mlp.experts.w2, w2.bfloat16())
    # a bf16 checkpoint records its dtype and loads as fp32 on CPU by default
    save_pretrained(model, tmp_path / "bf", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(tmp_path / "bf" / "model.safetensors", framework="pt") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
    assert all(p.dtype == torch.float32 for p in load_pretrained(tmp_path / "bf").parameters())


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"),
         r"missing tensor\(s\) model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"),
        (lambda t: t.pop("model.layers.2.mlp.shared_experts.down_proj.weight"),
         r"missing .*model\.layers\.2\.mlp\.shared_experts\.down_proj\.weight"),
        (lambda t: t.update({"model.layers.0.mlp.gate_proj.weight": torch.zeros(352, 127)}),
         r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \[352, 127\].*\[352, 128\]"),
        (lambda t: t.update({"model.layers.1.mlp.experts.0.down_proj.weight":
                             torch.zeros(88, 128)}),
         r"experts\.0\.down_proj\.weight has shape \[88, 128\].*\[128, 88\]"),
        (lambda t: t.update({"model.layers.1.mlp.bias": torch.zeros(3)}),
         r"unexpected tensor\(s\) model\.layers\.1\.mlp\.bias"),
        (lambda t: t.update({"model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(88, 128)}),
         r"experts\.8\.up_proj\.weight: expert index 8 out of range.*8 routed"),
    ],
    ids=["missing-expert", "missing-shared", "bad-shape", "bad-expert-shape", "unexpected",
         "expert-range"],
)
def test_bad_tensors_are_named(tmp_path, edit, match):
    save_pretrained(make_model(), tmp_path)
    rewrite(tmp_path, edit)
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(tmp_path)


def test_bad_files_are_named(tmp_path):
    save_pretrained(make_model(), tmp_path / "a", max_shard_size="300KB")
    shard = sorted((tmp_path / "a").glob("model-00002-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match=f"{shard.name}.*corrupt"):
        load_pretrained(tmp_path / "a")
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard file.*{shard.name}"):
        load_pretrained(tmp_path / "a")

    save_pretrained(make_model(), tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"b/model\.safetensors"):
        load_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: invalid config"):
        load_pretrained(tmp_path / "b")

    (tmp_path / "empty").mkdir()
    for p in (tmp_path / "nowhere", tmp_path / "empty", tmp_path / "b" / "model.safetensors"):
        with pytest.raises(CheckpointError, match="does not exist|not a checkpoint directory"):
            load_pretrained(p)


def test_save_refuses_and_reports(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="refusing to overwrite.*other"):
        save_pretrained(make_model(), other)
    assert (other / "notes.txt").read_text() == "precious"
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a regular file where the parent directory should be
    with pytest.raises(CheckpointError, match=f"cannot write a checkpoint under {blocker}"):
        save_pretrained(make_model(), blocker / "ck")


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ck"
    old = make_model(seed=0)
    save_pretrained(old, target, max_shard_size="300KB")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(make_model(seed=1), target, max_shard_size="300KB")
    assert len(calls) == 2
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary or backup directory left
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert_same(old, load_pretrained(target))

    monkeypatch.setattr(ckpt, "save_file", save_file)
    new = make_model(seed=1)
    save_pretrained(new, target)  # overwriting a checkpoint: sharded -> single file
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert_same(new, load_pretrained(target))


def test_memory_budget_is_checked_before_loading(tmp_path, monkeypatch):
    """A load that does not fit the budget is refused from the files' headers, before any tensor
    is read: a one-line error with both sizes, never the OOM killer."""
    from deepseek_moe import memory
    from deepseek_moe.memory import MemoryBudgetError

    model = DeepseekForCausalLM(get_config("deepseekmoe-tiny"))
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    real_convert = ckpt._convert

    def no_reading(*a, **k):
        raise AssertionError("tensors were read although the budget refuses them")

    monkeypatch.setattr(ckpt, "_convert", no_reading)
    with pytest.raises(MemoryBudgetError, match=r"^loading .* needs about \d+ MiB but the memory budget "
                       r"is 1 KiB \(--max-memory 1KiB\)$"):
        load_pretrained(tmp_path, max_memory="1KiB", experts="stacked")
    monkeypatch.setattr(ckpt, "_convert", real_convert)
    # Upcast to fp32 every tensor is a copy, 4 bytes a parameter.
    need32 = n * 4
    assert next(load_pretrained(tmp_path, max_memory=need32, experts="stacked").parameters()).dtype == torch.float32
    with pytest.raises(MemoryBudgetError):
        load_pretrained(tmp_path, max_memory=need32 - 1, experts="stacked", dtype=torch.float32)
    # The default budget is what the machine has available now.
    monkeypatch.setattr(memory, "available_bytes", lambda: need32 // 2)
    with pytest.raises(MemoryBudgetError, match=r"\(available on this machine now\)$"):
        load_pretrained(tmp_path, dtype=torch.float32)
    with pytest.raises(ValueError, match="cannot parse max_memory"):
        load_pretrained(tmp_path, max_memory="lots")


def test_a_model_too_big_to_stack_loads_per_expert_in_its_stored_dtype(tmp_path):
    """Over the budget for fp32 and stacked experts, ``auto`` keeps the stored bf16 and the
    checkpoint's own per-expert tensors, memory-mapped: nothing is allocated, and the model
    computes what the stacked one does."""
    from deepseek_moe.moe.experts import ExpertList, GroupedExperts

    cfg = get_config("deepseekmoe-tiny", num_hidden_layers=2, first_k_dense_replace=1)
    save_pretrained(DeepseekForCausalLM(cfg), tmp_path, dtype=torch.bfloat16)
    small = load_pretrained(tmp_path, max_memory="1KiB")
    big = load_pretrained(tmp_path, dtype=torch.bfloat16, experts="stacked")
    assert isinstance(small.model.layers[1].mlp.experts, ExpertList)
    assert isinstance(big.model.layers[1].mlp.experts, GroupedExperts)
    assert {p.dtype for p in small.parameters()} == {torch.bfloat16}
    # the per-expert names are the released ones: saving writes the same tensors back
    assert set(small.state_dict()) == set(ckpt.hf_state_dict(big))
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        a, b = small(x, labels=x), big(x, labels=x)
    torch.testing.assert_close(a.logits.float(), b.logits.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
    save_pretrained(small, tmp_path / "again")
    again = load_pretrained(tmp_path / "again", dtype=torch.bfloat16, experts="stacked")
    assert all(torch.equal(p, q) for p, q in zip(again.state_dict().values(), big.state_dict().values()))


def test_available_memory_is_plausible():
    from deepseek_moe.memory import available_bytes, format_size, parse_size

    assert 2**26 < available_bytes() < 2**50
    assert parse_size("20GiB", "max_memory") == 20 * 2**30 and format_size(20 * 2**30) == "20.0 GiB"


def test_from_pretrained_and_save_pretrained_round_trip(tmp_path, run):
    """The HF-style methods: save_pretrained then from_pretrained gives the same tensors bit for
    bit; from_pretrained also takes a run directory and its checkpoints/ folder."""
    cfg = get_config("deepseekmoe-tiny", num_hidden_layers=2, first_k_dense_replace=1, n_shared_experts=2)
    model = DeepseekForCausalLM(cfg)
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    assert (tmp_path / "ckpt" / "tokenizer.json").read_text() == "{}"
    again = DeepseekForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert not again.training
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert DeepseekForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16).lm_head.weight.dtype \
        == torch.bfloat16
    from deepseek_moe.runs import resolve_checkpoint

    newest = load_pretrained(resolve_checkpoint(run)[0])
    for where in (run, run / "checkpoints"):
        got = DeepseekForCausalLM.from_pretrained(where)
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), newest.state_dict().values()))
    from deepseek_moe import DeepseekForCausalLM as top

    assert top is DeepseekForCausalLM
