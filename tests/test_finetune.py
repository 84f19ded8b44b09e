"""Fine-tuning: SFT data (loss masks, packing, bad lines), LoRA (adapters, merge), the finetune run."""

import json
from pathlib import Path

import pytest
import torch

from deepseek_moe.chat import RELEASED, load_chat_template
from deepseek_moe.config import DeepseekMoEConfig
from deepseek_moe.data.sft import IGNORE, SFTDataError, SFTRows, collate, encode_chat, pack, read_examples
from deepseek_moe.data.tokenizer import load_tokenizer, train_tokenizer
from deepseek_moe.finetune import FinetuneConfig, finetune, lora_parameter_count
from deepseek_moe.lora import (LoRAConfig, add_lora, load_adapter, lora_modules, merge, save_adapter,
                               trainable_counts)
from deepseek_moe.model import DeepseekForCausalLM
from deepseek_moe.presets import get_config

NAMES = ["Ada", "Bob", "Cyd", "Dee", "Eve", "Fay"]
COLOURS = ["red", "blue", "green", "amber", "violet", "grey"]


def conversations() -> list[dict]:
    """Small conversations: a system line on some, two turns on others."""
    out = []
    for i, (name, colour) in enumerate(zip(NAMES, COLOURS)):
        msgs = [{"role": "user", "content": f"What colour does {name} like?"},
                {"role": "assistant", "content": f"{name} likes {colour}."}]
        if i % 2:
            msgs = [{"role": "system", "content": "Answer briefly."}] + msgs
        if i % 3 == 0:
            msgs += [{"role": "user", "content": "And the number?"},
                     {"role": "assistant", "content": f"{name}'s number is {i * 7 + 3}."}]
        out.append({"messages": msgs})
    return out


def tiny_config(**kw) -> DeepseekMoEConfig:
    return get_config("deepseekmoe-tiny").replace(
        vocab_size=384, hidden_size=48, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
        first_k_dense_replace=1, intermediate_size=96, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=2, max_position_embeddings=128, name="sft-tiny", **kw)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random tiny checkpoint (a dense first layer, 2 shared experts) with a tokenizer trained on
    the conversations' text."""
    root = tmp_path_factory.mktemp("sft")
    d = root / "base"
    texts = [m["content"] for c in conversations() for m in c["messages"]] * 20
    texts += ["User: ", "Assistant: ", "Assistant:"] * 20
    tok = train_tokenizer(texts, vocab_size=384)
    torch.manual_seed(0)
    model = DeepseekForCausalLM(tiny_config())
    (root / "tok.json").write_text(tok.to_str())
    model.save_pretrained(d, tokenizer=root / "tok.json")
    return d


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def template_for(base: Path):
    return load_chat_template(base, RELEASED).bind(load_tokenizer(base / "tokenizer.json"))


# --- the data ------------------------------------------------------------------------------------
def test_only_assistant_tokens_are_targets(base):
    tok, tpl = load_tokenizer(base / "tokenizer.json"), template_for(base)
    msgs = conversations()[0]["messages"]
    ids, targets = encode_chat(msgs, tok, tpl)
    assert tok.decode(ids, skip_special_tokens=False) == tpl.render(msgs)  # the whole rendering
    learned = tok.decode([t for t, on in zip(ids, targets) if on], skip_special_tokens=False)
    eos = tpl.eos_token
    # exactly the assistant turns with their end-of-turn token; no prompt text
    assert learned == "".join(" " + m["content"] + eos for m in msgs if m["role"] == "assistant")
    assert "User" not in learned and "What colour" not in learned


def test_prompt_completion_targets(base, tmp_path):
    tok, tpl = load_tokenizer(base / "tokenizer.json"), template_for(base)
    f = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "What colour does Ada like? ", "completion": "Ada likes red."}])
    (ex,) = read_examples(f, tok, tpl, 64)
    learned = tok.decode([t for t, on in zip(ex.ids, ex.targets) if on], skip_special_tokens=False)
    assert learned == "Ada likes red." + tpl.eos_token


def test_bad_examples_are_reported_by_line(base, tmp_path):
    tok, tpl = load_tokenizer(base / "tokenizer.json"), template_for(base)
    good = conversations()[0]
    f = write_jsonl(tmp_path / "bad.jsonl", [
        good,
        "{not json",
        {"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"text": "wrong schema"},
        {"prompt": "p", "completion": "Ada likes red. " * 40},  # over-long
        good,
    ])
    with pytest.raises(SFTDataError) as e:
        read_examples(f, tok, tpl, 64)
    msg = str(e.value)
    for line, why in ((2, "not JSON"), (3, "no assistant turn"), (4, "message 0 has role 'robot'"), (5, "needs \"messages\""),
                      (6, "163 tokens, longer than seq_len 64")):
        assert f"line {line}: {why}" in msg, msg
    assert "line 1:" not in msg and "line 7:" not in msg
    said = []
    kept = read_examples(f, tok, tpl, 64, skip_bad=True, say=said.append)
    assert [e.line for e in kept] == [1, 7] and "skipping 5 bad example(s)" in said[0]


def test_pack_is_dense_and_keeps_examples_whole():
    lengths = [9, 3, 7, 1, 5, 5, 2, 8]
    rows = pack(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == -(-sum(lengths) // 10)  # 40 tokens in 4 rows: as dense as it gets here
    assert pack(lengths, 10) == rows  # deterministic


@pytest.mark.parametrize("packing", [True, False])
def test_rows_equal_examples_alone(base, tmp_path, packing):
    """Packing without attention across examples (or padding): every example's logits in a row
    equal its logits alone (fp32, 1e-5)."""
    tok, tpl = load_tokenizer(base / "tokenizer.json"), template_for(base)
    f = write_jsonl(tmp_path / "c.jsonl", conversations())
    examples = read_examples(f, tok, tpl, 128)
    rows = SFTRows(examples, 128, packing=packing, pad_id=0)
    assert len(rows) < len(examples) if packing else len(rows) == len(examples)
    model = DeepseekForCausalLM.from_pretrained(base)
    b = collate([rows[i] for i in range(len(rows))])
    assert b["input_ids"].shape[1] == max(sum(len(examples[k]) for k in r) for r in rows.rows)  # cut
    logits = model(**b).logits
    for r, members in enumerate(rows.rows):
        start = 0
        for k in members:
            ex = examples[k]
            alone = model(torch.tensor([ex.ids])).logits[0]
            got = logits[r, start:start + len(ex)]
            assert (got - alone).abs().max() <= 1e-5 * alone.abs().max()
            start += len(ex)


def test_prompt_tokens_carry_no_loss(base, tmp_path):
    """The gradient of the loss reaches the logits only where they predict a target token."""
    tok, tpl = load_tokenizer(base / "tokenizer.json"), template_for(base)
    examples = read_examples(write_jsonl(tmp_path / "c.jsonl", conversations()), tok, tpl, 128)
    rows = SFTRows(examples, 128, packing=True, pad_id=0)
    b = collate([rows[0], rows[1]])
    model = DeepseekForCausalLM.from_pretrained(base).train()
    out = model(**b)
    out.logits.retain_grad()
    out.lm_loss.backward()
    grad_norm = out.logits.grad[:, :-1].abs().sum(-1)  # position t predicts token t + 1
    target = b["labels"][:, 1:] != IGNORE
    assert target.any() and (~target).any()
    assert torch.all(grad_norm[~target] == 0)
    assert torch.all(grad_norm[target] > 0)


# --- LoRA ----------------------------------------------------------------------------------------
def test_lora_trains_only_adapters_and_merges(base, tmp_path, capsys):
    model = DeepseekForCausalLM.from_pretrained(base).train()
    x = torch.randint(0, 384, (2, 12))
    before = model(x).logits.detach()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    n = add_lora(model, LoRAConfig(4, 8.0))
    trainable, total = trainable_counts(model)
    print(f"LoRA rank 4: {trainable:,} trainable of {total:,}")
    assert n == trainable == sum(p.numel() for m in lora_modules(model).values() for p in m.parameters())
    names = {k.rsplit(".", 2)[0] for k in dict(model.named_parameters()) if ".lora." in k or ".adapters." in k}
    assert any("experts.adapters" in k for k in names) and any("self_attn.q_proj" in k for k in names)
    assert any("shared_experts.down_proj" in k for k in names) and any("layers.0.mlp.up_proj" in k for k in names)
    assert torch.equal(model(x).logits, before)  # B = 0: the adapted model starts as the base
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # the base did not move
    model.eval()
    unmerged = model(x).logits.detach()
    assert (unmerged - before).abs().max() > 1e-4  # the adapters learned something
    save_adapter(model, tmp_path / "adapter")
    # adapters load on their own onto a fresh base, unmerged and merged
    fresh = DeepseekForCausalLM.from_pretrained(base)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(x).logits, unmerged)
    assert merge(model) > 0 and not lora_modules(model)
    merged = model(x).logits.detach()
    assert (merged - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()
    assert "LoRA rank 4" in capsys.readouterr().out


def test_lora_count_on_16b_preset():
    counts = lora_parameter_count(get_config("deepseekmoe-16b"), 8)
    cfg = get_config("deepseekmoe-16b")
    D, I, E, L = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_hidden_layers
    assert counts["attention"] == L * 4 * 8 * (D + D)
    assert counts["experts"] == (L - 1) * E * 3 * 8 * (D + I)
    assert counts["total"] == sum(counts[t] for t in ("attention", "experts", "shared", "mlp"))


# --- the run -------------------------------------------------------------------------------------
def sft_config(base: Path, data: Path, out: Path, **kw) -> FinetuneConfig:
    kw = {"seq_len": 64, "batch_size": 2, "lr": 3e-3, "steps": 4, "progress": False, "ckpt_every": 2,
          "eval_sequences": 8, "template": RELEASED, **kw}
    return FinetuneConfig(checkpoint=str(base), data=str(data), out=str(out), **kw)


def test_finetune_learns_a_conversation_set(base, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", conversations())
    r = finetune(sft_config(base, data, tmp_path / "run", steps=None, epochs=100, batch_size=3, lr=4e-3))
    assert r.val_loss < 0.1, r.val_loss  # the assistant tokens of the memorised examples
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["lm_loss"] > 1.0
    assert (tmp_path / "run" / "loss_curve.png").is_file()
    ckpt = r.checkpoint
    assert json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"]
    model = DeepseekForCausalLM.from_pretrained(tmp_path / "run")  # a whole model
    assert model.num_parameters() == DeepseekForCausalLM.from_pretrained(base).num_parameters()


@pytest.mark.parametrize("lora", [0, 4])
def test_finetune_resumes_exactly(base, tmp_path, lora):
    data = write_jsonl(tmp_path / "c.jsonl", conversations())
    whole = finetune(sft_config(base, data, tmp_path / "whole", lora_rank=lora))
    finetune(sft_config(base, data, tmp_path / "parts", lora_rank=lora, stop_after=2))
    parts = finetune(sft_config(base, data, tmp_path / "parts", lora_rank=lora), resume=True)
    a, b = (DeepseekForCausalLM.from_pretrained(r.checkpoint) for r in (whole, parts))
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    ma = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("loss") for m in ma] == [m.get("loss") for m in mb]
    if lora:  # checkpoints hold the adapters, not the base
        assert not list(parts.checkpoint.glob("model*.safetensors"))
        assert (tmp_path / "parts" / "adapter" / "adapter_model.safetensors").is_file()


def test_lora_merge_writes_a_model(base, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", conversations())
    finetune(sft_config(base, data, tmp_path / "run", lora_rank=4, merge=True, steps=2))
    merged = DeepseekForCausalLM.from_pretrained(tmp_path / "run" / "merged")
    adapted = DeepseekForCausalLM.from_pretrained(tmp_path / "run")  # base + the newest adapters
    x = torch.randint(0, 384, (1, 10))
    assert (merged(x).logits - adapted(x).logits).abs().max() <= 1e-5
    assert (tmp_path / "run" / "merged" / "tokenizer_config.json").is_file()


def test_finetune_command(base, tmp_path, capsys):
    from deepseek_moe.cli import main

    data = write_jsonl(tmp_path / "c.jsonl", conversations())
    out = tmp_path / "run"
    args = ["finetune", str(base), "--data", str(data), "--out", str(out), "--steps", "2", "--seq-len", "64",
            "--batch-size", "2", "--lora-rank", "2", "--lora-targets", "attention", "experts", "--merge",
            "--template", "released", "--no-progress"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "LoRA rank 2 (alpha 4) on attention, experts; trainable parameters" in said
    assert (out / "merged" / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert main(args) == 2  # the folder holds a run: refused, nothing lost
    assert "refusing to start a new run" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversations()[0], {"prompt": 1}])
    assert main(args[:3] + [str(bad), "--out", str(tmp_path / "r2")] + args[6:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2: needs" in err[0]
    assert main(["eval", str(out), "--no-progress"]) == 2  # no pre-training corpus to default to
    assert "records no text corpus (a fine-tuning run)" in capsys.readouterr().err
    assert main(["params", "deepseekmoe-16b", "--lora-rank", "8"]) == 0
    assert "LoRA rank 8 trains 150,460,928 of 16,375,728,128" in capsys.readouterr().out


def test_full_finetune_under_torchrun_equals_one_process(base, tmp_path):
    """Expert parallelism over 2 gloo ranks gives the single process's losses."""
    from test_distributed import losses, single, torchrun

    data = write_jsonl(tmp_path / "c.jsonl", conversations())
    args = ["finetune", str(base), "--data", str(data), "--steps", "3", "--seq-len", "64", "--batch-size", "2",
            "--lr", "3e-3", "--template", "released", "--no-progress", "--dtype", "float32"]
    single(*args, "--out", str(tmp_path / "one"))
    torchrun(2, "-m", "deepseek_moe", *args, "--out", str(tmp_path / "ep"), "--expert-parallel", "2")
    a, b = losses(tmp_path / "one"), losses(tmp_path / "ep")
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_padding_takes_no_part_in_the_balance_losses(seq_aux):
    from deepseek_moe.moe.losses import balance_losses

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 10, 8, generator=g).softmax(-1)
    topk = scores.topk(2, dim=-1).indices
    valid = torch.arange(10) < torch.tensor([[6], [10]])
    padded = balance_losses(scores, topk, n_groups=2, seq_aux=seq_aux, valid_BS=valid)
    if seq_aux:  # each sequence on its own real tokens
        parts = [balance_losses(scores[i:i + 1, :n], topk[i:i + 1, :n], n_groups=2) for i, n in ((0, 6), (1, 10))]
        want = [sum(p[j] for p in parts) / 2 for j in range(2)]
    else:  # the real tokens of the batch together
        want = balance_losses(scores[valid][None], topk[valid][None], n_groups=2)
    for got, ref in zip(padded, want):
        assert torch.allclose(got, ref, atol=1e-6)
    assert not torch.allclose(balance_losses(scores, topk, n_groups=2, seq_aux=seq_aux)[0], padded[0])


def test_lora_can_train_embeddings_and_head_whole(base, tmp_path):
    model = DeepseekForCausalLM.from_pretrained(base).train()
    add_lora(model, LoRAConfig(2, 4.0, targets=("attention",), train_also=("embeddings", "head")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= trainable
    assert not any("norm" in n or "experts.w" in n or n.endswith("mlp.gate.weight") for n in trainable)
    x = torch.randint(0, 384, (2, 12))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x, labels=x).loss.backward()
    opt.step()
    model.eval()
    want = model(x).logits.detach()
    save_adapter(model, tmp_path / "a")
    fresh = DeepseekForCausalLM.from_pretrained(base)
    load_adapter(fresh, tmp_path / "a")  # the whole tensors come back with the adapters
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    assert torch.equal(fresh(x).logits, want)
