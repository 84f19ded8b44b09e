"""The random checkpoint in the hub snapshot's layout (streamed, deterministic, atomic), the
loader on that published layout (extra config keys, remote-code stubs, pickle-only weights
refused) and ``special_tokens``. Small configs, CPU only; the 16B config only for its plan and
its tokenizer."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from deepseek_moe.checkpoint import CheckpointError, hf_state_dict, load_pretrained, plan_shards
from deepseek_moe.data.tokenizer import (
    TokenizerError, load_tokenizer, save_tokenizer, special_tokens, train_tokenizer,
)
from deepseek_moe.model import DeepseekForCausalLM
from deepseek_moe.presets import get_config
from deepseek_moe.random_checkpoint import (
    BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, build_tokenizer, write_random_checkpoint,
)

TINY = get_config("tiny", vocab_size=1024, num_hidden_layers=3, first_k_dense_replace=1,
                  n_routed_experts=8, num_experts_per_tok=2)
SHARD = 200_000  # bytes: a few shards for TINY
FILES = {"config.json", "generation_config.json", "configuration_deepseek.py",
         "modeling_deepseek.py", "tokenizer.json", "tokenizer_config.json",
         "model.safetensors.index.json"}


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("rc") / "chat", TINY, seed=3,
                                   shard_bytes=SHARD, progress=False, chat=True)


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_layout_of_the_hub_snapshot(snapshot):
    names = set(files(snapshot))
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert names == FILES | set(shards) and len(shards) > 2
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                      for k in range(1, len(shards) + 1)]
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    total, stored = 0, {}
    for shard in shards:
        with safe_open(snapshot / shard, framework="pt") as f:
            for n in f.keys():
                assert f.get_slice(n).get_dtype() == "BF16"
                stored[n] = shard
                total += f.get_tensor(n).nbytes
    assert index["weight_map"] == stored and index["metadata"]["total_size"] == total
    with torch.device("meta"):  # the released names, every one of them
        assert set(stored) == set(hf_state_dict(DeepseekForCausalLM(TINY)))
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in stored

    cfg = json.loads((snapshot / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekForCausalLM"] and cfg["model_type"] == "deepseek"
    assert cfg["auto_map"] == {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"}
    assert cfg["torch_dtype"] == "bfloat16"
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1022, 1023)  # none in TINY: the last two
    assert json.loads((snapshot / "generation_config.json").read_text()) == {
        "_from_model_config": True, "bos_token_id": 1022, "eos_token_id": 1023}
    for stub in ("configuration_deepseek.py", "modeling_deepseek.py"):
        assert "placeholder" in (snapshot / stub).read_text()

    tok_cfg = json.loads((snapshot / "tokenizer_config.json").read_text())
    assert tok_cfg["bos_token"]["content"] == BOS_TOKEN and tok_cfg["eos_token"]["content"] == EOS_TOKEN
    assert tok_cfg["add_bos_token"] is True and tok_cfg["add_eos_token"] is False
    assert tok_cfg["tokenizer_class"] == "LlamaTokenizerFast" and tok_cfg["model_max_length"] == 1024
    assert tok_cfg["chat_template"] == CHAT_TEMPLATE
    tok = load_tokenizer(snapshot)
    assert tok.get_vocab_size() <= TINY.vocab_size
    assert (tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)) == (1022, 1023)
    text = "def f(x):\n    return x  # ünïcode"
    assert tok.encode(text).ids[0] == 1022  # add_bos_token, as the release
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def test_loads_with_released_values(snapshot):
    model = load_pretrained(snapshot, dtype=torch.bfloat16)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (1022, 1023)
    assert torch.equal(model.model.norm.weight, torch.ones(128, dtype=torch.bfloat16))
    w = model.model.layers[1].mlp.experts.w1.float()
    assert abs(w.std().item() - 0.006) < 3e-4 and abs(w.mean().item()) < 3e-4
    assert "modeling_deepseek" not in sys.modules and "configuration_deepseek" not in sys.modules


def test_16b_plan_and_tokenizer():
    cfg = get_config("deepseekmoe-16b")
    with torch.device("meta"):
        entries = [(n, tuple(t.shape)) for n, t in hf_state_dict(DeepseekForCausalLM(cfg)).items()]
    sizes_of = {n: 2 * math.prod(shape) for n, shape in entries}  # bf16
    shards = plan_shards(list(sizes_of.items()), 5 * 10**9)  # the hub's 5GB shards: 7 of them
    sizes = [sum(sizes_of[n] for n in shard) for shard in shards]
    assert len(shards) == 7 and max(sizes) <= 5e9 and 32.7e9 < sum(sizes) < 32.8e9
    tok = build_tokenizer(cfg)
    assert tok.get_vocab_size() <= cfg.vocab_size == 102400
    assert tok.id_to_token(100000) == BOS_TOKEN and tok.id_to_token(100001) == EOS_TOKEN
    assert tok.token_to_id(BOS_TOKEN) == 100000 and tok.token_to_id(EOS_TOKEN) == 100001
    enc = tok.encode("x = 1" + EOS_TOKEN, add_special_tokens=False).ids
    assert enc[-1] == 100001 and max(enc[:-1]) < 8192  # fillers are never produced


def test_deterministic_for_a_seed(tmp_path, snapshot):
    again = write_random_checkpoint(tmp_path / "again", TINY, seed=3, shard_bytes=SHARD,
                                    progress=False, chat=True)
    assert files(again) == files(snapshot)
    other = write_random_checkpoint(tmp_path / "other", TINY, seed=4, shard_bytes=10**9,
                                    progress=False)
    assert (other / "model.safetensors").is_file()  # one shard: no index, as the hub writes it
    assert not (other / "model.safetensors.index.json").exists()
    assert "chat_template" not in json.loads((other / "tokenizer_config.json").read_text())
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    with safe_open(snapshot / index["weight_map"][name], framework="pt") as a, \
            safe_open(other / "model.safetensors", framework="pt") as b:
        assert not torch.equal(a.get_tensor(name), b.get_tensor(name))  # another seed
    same = write_random_checkpoint(tmp_path / "same", TINY, seed=4, progress=False)
    with safe_open(same / "model.safetensors", framework="pt") as a, \
            safe_open(other / "model.safetensors", framework="pt") as b:
        assert torch.equal(a.get_tensor(name), b.get_tensor(name))  # independent of sharding


def test_refuses_non_empty_and_force_replaces_only_a_checkpoint(tmp_path, snapshot):
    target = tmp_path / "ck"
    target.mkdir()
    write_random_checkpoint(target, TINY, progress=False)  # an empty directory is taken over
    before = files(target)
    with pytest.raises(CheckpointError, match="refusing to write into .*ck: not empty"):
        write_random_checkpoint(target, TINY, seed=1, progress=False)
    assert files(target) == before
    write_random_checkpoint(target, TINY, seed=3, shard_bytes=SHARD, progress=False,
                            chat=True, force=True)
    assert files(target) == files(snapshot)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary directory left
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        write_random_checkpoint(notes, TINY, progress=False, force=True)
    assert (notes / "a.txt").read_text() == "precious"


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import deepseek_moe.random_checkpoint as rc

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(rc, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        write_random_checkpoint(tmp_path / "ck", TINY, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_script_help_and_run(tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "random_checkpoint.py"
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--shard-size" in r.stdout and "--chat" in r.stdout
    r = subprocess.run([sys.executable, str(script), str(tmp_path), "--preset", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "unknown preset 'nope'" in r.stderr


# --- the published layout loads; pickles never --------------------------------------------------
def test_published_layout_with_extras_loads(tmp_path, snapshot):
    ck = shutil.copytree(snapshot, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(_name_or_path="deepseek-ai/deepseek-moe-16b-chat", transformers_version="4.36.0",
               initializer_range=0.02, unknown_field=[1, 2])
    (ck / "config.json").write_text(json.dumps(cfg))
    (ck / "generation_config.json").write_text('{"eos_token_id": 7, "do_sample": true}')
    (ck / "modeling_deepseek.py").write_text("raise SystemExit('remote code ran')\n")
    assert torch.equal(load_pretrained(ck).lm_head.weight, load_pretrained(snapshot).lm_head.weight)
    assert load_pretrained(ck).config.eos_token_id == 1023  # config.json's, not generation_config's
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported rope_scaling"):
        load_pretrained(ck)


@pytest.mark.parametrize("names", [
    ["pytorch_model.bin"],
    ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
     "pytorch_model.bin.index.json"],
    ["consolidated.pt"],
    ["weights.pth"],
], ids=["bin", "sharded-bin", "pt", "pth"])
def test_pickle_only_weights_are_refused(tmp_path, monkeypatch, names):
    def never(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", never)
    import pickle

    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(pickle, "loads", never)
    TINY.save(tmp_path / "config.json")
    for n in names:
        (tmp_path / n).write_bytes(b"\x80\x02 not a real pickle")
    with pytest.raises(CheckpointError, match=rf"pickle files \({names[0]}.*never opens.*"
                                               r"convert them to safetensors.*save_file"):
        load_pretrained(tmp_path)


def test_safetensors_win_over_pickles(tmp_path, monkeypatch, snapshot):
    def never(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", never)
    ck = shutil.copytree(snapshot, tmp_path / "ck")
    (ck / "pytorch_model.bin").write_bytes(b"\x80\x02 not a real pickle")
    load_pretrained(ck)


# --- special_tokens ------------------------------------------------------------------------------
def test_special_tokens_of_the_release_layout(snapshot):
    st = special_tokens(snapshot)
    assert st == {"bos_token": BOS_TOKEN, "bos_token_id": 1022, "eos_token": EOS_TOKEN,
                  "eos_token_id": 1023, "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
    jinja2 = pytest.importorskip("jinja2")
    text = jinja2.Template(st["chat_template"]).render(
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "Who are you?"}],
        bos_token=st["bos_token"], eos_token=st["eos_token"], add_generation_prompt=True)
    assert text == (f"{BOS_TOKEN}User: Hi\n\nAssistant: Hello{EOS_TOKEN}"
                    f"User: Who are you?\n\nAssistant:")


def test_special_tokens_fallbacks_and_errors(tmp_path):
    # this project's own checkpoints: tokenizer.json only, no bos, eos = <|endoftext|>
    save_tokenizer(train_tokenizer(["hello world " * 50], vocab_size=300), tmp_path / "tokenizer.json")
    assert special_tokens(tmp_path) == {
        "bos_token": None, "bos_token_id": None, "eos_token": "<|endoftext|>", "eos_token_id": 0,
        "add_bos_token": False, "chat_template": None}
    # ids from config.json when tokenizer_config.json does not name the tokens
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 5, "eos_token_id": 0}))
    st = special_tokens(tmp_path)
    assert (st["bos_token_id"], st["eos_token_id"]) == (5, 0) and st["bos_token"] is not None
    # plain strings, a list of named templates
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    st = special_tokens(tmp_path)
    assert st["bos_token_id"] == st["eos_token_id"] == 0 and st["chat_template"] == "D"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(TokenizerError, match=r"names eos_token '</s>'.*tokenizer\.json does not have"):
        special_tokens(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer_config.json is not valid JSON"):
        special_tokens(tmp_path)


# --- streamed: the peak memory follows the shard, not the model ---------------------------------
def test_peak_memory_stays_under_the_model_size(tmp_path):
    """About 650 MB of bf16 weights written in 32 MB shards: the writer's peak RSS grows by far
    less than the model (a warm-up write first takes the fixed costs, tokenizer training
    among them, so that what is measured is the weights' share)."""
    code = textwrap.dedent(f"""
        import json, resource, sys
        from deepseek_moe.presets import get_config
        from deepseek_moe.random_checkpoint import write_random_checkpoint
        big = get_config("tiny", hidden_size=1024, num_attention_heads=8,
                         moe_intermediate_size=256, num_hidden_layers=6)
        small = get_config("tiny", num_hidden_layers=1)
        write_random_checkpoint({str(tmp_path / 'warm')!r}, small, progress=False)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = write_random_checkpoint({str(tmp_path / 'big')!r}, big, shard_bytes=32 * 10**6,
                                      progress=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({{"base": base, "peak": peak}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rss = json.loads(r.stdout.strip().splitlines()[-1])
    index = json.loads((tmp_path / "big" / "model.safetensors.index.json").read_text())
    model_bytes = index["metadata"]["total_size"]
    assert model_bytes > 600e6 and len(set(index["weight_map"].values())) > 15
    grew = rss["peak"] - rss["base"]
    assert grew < model_bytes / 4, (grew, model_bytes)
