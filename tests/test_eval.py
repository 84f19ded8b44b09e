"""Evaluation, multiple choice and the expert analyses (issue: evaluation and analyses)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from deepseek_moe.analyze import analyze, disabled_count, routing_options
from deepseek_moe.cli import main
from deepseek_moe.evaluate import evaluate_splits, evaluate_tokens
from deepseek_moe.model import DeepseekForCausalLM
from deepseek_moe.moe.router import HashRouter, TopKRouter
from deepseek_moe.multiple_choice import (MCExample, builtin_task, evaluate_multiple_choice,
                                          load_task_file, score_continuations)
from deepseek_moe.plots import plot_analysis
from deepseek_moe.presets import get_config
from deepseek_moe.runs import load_checkpoint, resolve_checkpoint

SMALL = {"vocab_size": 512, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
         "moe_intermediate_size": 24, "n_routed_experts": 15, "num_experts_per_tok": 3}


def small_model(preset: str = "deepseekmoe-tiny", seed: int = 0, **kw) -> DeepseekForCausalLM:
    torch.manual_seed(seed)
    base = dict(SMALL, num_experts_per_tok=1) if preset.startswith("hash") else SMALL
    overrides = dict(base, **kw) if "dense" not in preset else {
        k: v for k, v in SMALL.items() if k in ("vocab_size", "num_hidden_layers", "hidden_size",
                                                 "num_attention_heads")}
    m = DeepseekForCausalLM(get_config(preset, **overrides))
    m.init_weights(0.05)  # larger than 0.006 so routing and outputs are far from uniform
    return m.eval()


def test_resolve_checkpoint_accepts_run_checkpoints_and_checkpoint(run, tmp_path):
    ckpt, run_dir = resolve_checkpoint(run)
    assert ckpt.name == "step-00000004" and run_dir == run
    assert resolve_checkpoint(run / "checkpoints") == (ckpt, run)
    assert resolve_checkpoint(ckpt) == (ckpt, run)
    for bad, msg in ((tmp_path, "is not a checkpoint"), (tmp_path / "nope", "does not exist"),
                     (ckpt / "config.json", "is a file")):
        with pytest.raises(ValueError, match=msg):
            resolve_checkpoint(bad)


# --- routing options ------------------------------------------------------------------------------------
def test_router_disable_top_masks_the_best_experts_and_keeps_gate_values():
    torch.manual_seed(0)
    router = TopKRouter(16, 10, 3, norm_topk_prob=False)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(50, 16)
    out = router(x, disable_top=2)
    scores = torch.softmax(x @ router.weight.T, -1)
    for t in range(50):
        order = scores[t].argsort(descending=True).tolist()
        assert out.topk_ids_TK[t].tolist() == order[2:5]  # ranks 3..5 once the best two are masked
        torch.testing.assert_close(out.topk_weights_TK[t], scores[t, order[2:5]])
    plain = router(x)
    again = router(x, top_k=3, disable_top=0)
    assert torch.equal(plain.topk_ids_TK, again.topk_ids_TK)
    with pytest.raises(ValueError, match="cannot route"):
        router(x, top_k=3, disable_top=8)
    with pytest.raises(ValueError, match="fixed expert"):
        HashRouter(10)(x, torch.arange(50), disable_top=1)


def test_routing_options_default_is_plain_and_is_restored():
    m = small_model()
    x = torch.randint(0, 512, (2, 24))
    plain = m(x).logits
    K = m.config.num_experts_per_tok
    with routing_options(m, top_k=K, disable_top=0):
        assert torch.equal(m(x).logits, plain)  # the trained k and r = 0 are plain evaluation
    with routing_options(m, disable_shared=True):
        no_shared = m(x).logits
    assert not torch.allclose(no_shared, plain, atol=1e-4)  # the shared expert matters
    with routing_options(m, disable_top=2):
        assert not torch.allclose(m(x).logits, plain, atol=1e-4)
    with routing_options(m, top_k=K + 2) as opts:
        assert opts.top_k == K + 2
        assert int(m(x).tokens_per_expert.sum()) == 2 * 24 * (K + 2) * m.config.num_hidden_layers
    assert torch.equal(m(x).logits, plain)  # restored
    with pytest.raises(RuntimeError):
        with routing_options(m, disable_top=1):
            raise RuntimeError("inside")
    assert torch.equal(m(x).logits, plain)  # restored after an error too


def test_routing_option_errors_name_the_problem():
    with pytest.raises(ValueError, match="dense"):
        with routing_options(small_model("dense-tiny")):
            pass
    with pytest.raises(ValueError, match="hash routing"):
        with routing_options(small_model("hash-tiny"), disable_top=1):
            pass
    with pytest.raises(ValueError, match="no shared experts"):
        with routing_options(small_model("gshard-tiny"), disable_shared=True):
            pass
    m = small_model()
    with pytest.raises(ValueError, match="top_k must be in 1..15"):
        with routing_options(m, top_k=16):
            pass
    with pytest.raises(ValueError, match="cannot disable 13"):
        with routing_options(m, disable_top=13):
            pass
    assert [disabled_count(r / 16, 63) for r in range(5)] == [0, 4, 8, 12, 16]


# --- held-out loss ----------------------------------------------------------------------------------------
def test_evaluate_tokens_matches_the_model_loss():
    m = small_model()
    tokens = np.random.default_rng(0).integers(0, 512, 3 * 32 + 10).astype(np.uint16)
    st = evaluate_tokens(m, tokens, seq_len=32, batch_size=2)
    nll, n = 0.0, 0
    for s in range(0, len(tokens), 32):
        x = torch.from_numpy(tokens[s:s + 32].astype(np.int64))[None]
        out = m(x, labels=x)
        nll += out.lm_loss.item() * (x.shape[1] - 1)
        n += x.shape[1] - 1
    assert st.predicted == n == 3 * 31 + 9
    assert st.fed == len(tokens)
    assert st.loss == pytest.approx(nll / n, rel=1e-5)
    assert st.tokens_per_expert.shape == (2, 15)
    assert int(st.tokens_per_expert.sum()) == len(tokens) * 3 * 2
    assert st.routing_entropy.shape == (2,) and bool((st.routing_entropy > 0).all())
    assert bool((st.routing_entropy <= math.log(15) + 1e-5).all())


def test_evaluate_splits_per_domain_and_bits_per_byte(run):
    model, tok, ckpt, run_dir = load_checkpoint(run)
    from deepseek_moe.evaluate import eval_cache

    cache = eval_cache(ckpt, run_dir, progress=False)
    assert cache.domains == ["code", "prose"] or set(cache.domains) == {"code", "prose"}
    rep = evaluate_splits(model, cache, ("validation", "test"), seq_len=64, progress=False)
    for split in ("validation", "test"):
        scores = rep.splits[split]
        assert set(scores) == {"code", "prose", "all"}
        meta = cache.meta["splits"][split]["domains"]
        for d in ("code", "prose"):
            sc = scores[d]
            assert sc.tokens == meta[d]["tokens"] and sc.bytes == meta[d]["bytes"]
            assert sc.bits_per_byte == pytest.approx(sc.loss / math.log(2) * sc.tokens / sc.bytes)
            assert sc.perplexity == pytest.approx(math.exp(sc.loss))
            # the per-domain loss is evaluate_tokens over that domain's documents
            direct = evaluate_tokens(model, cache.domain_tokens(split, d), 64).loss
            assert sc.loss == pytest.approx(direct, rel=1e-6)
        w = sum(scores[d].loss * scores[d].tokens for d in ("code", "prose")) / scores["all"].tokens
        assert scores["all"].loss == pytest.approx(w)
    js = rep.to_dict()
    assert js["splits"]["test"]["prose"]["bits_per_byte"] == rep.splits["test"]["prose"].bits_per_byte
    assert "bits/byte" in rep.format()


# --- multiple choice ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bigram():
    """A model whose next-token distribution is a hand-set bigram table, with a word tokenizer.

    Attention and MLP outputs are zeroed, so the logits are lm_head(norm(embed(current token))).
    From word t the next word t+1 has probability 1/2 and each of the 7 others 1/14.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = list("abcdefgh")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    V, D = 8, 16
    cfg = get_config("dense-tiny", vocab_size=V, hidden_size=D, num_attention_heads=2,
                     num_key_value_heads=2, num_hidden_layers=1, rms_norm_eps=1e-12)
    m = DeepseekForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.model.norm.weight.fill_(1.0)
        for layer in m.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        m.model.embed_tokens.weight[:, :V] = torch.eye(V)  # RMSNorm turns e_t into sqrt(D) e_t
        for t in range(V):
            m.lm_head.weight[(t + 1) % V, t] = math.log(7) / math.sqrt(D)
    return m, tok


def test_bigram_fixture_has_the_hand_set_probabilities(bigram):
    m, _ = bigram
    logp = torch.log_softmax(m(torch.tensor([[2]])).logits[0, -1], -1)
    assert logp[3].item() == pytest.approx(math.log(1 / 2), abs=1e-5)
    assert logp[5].item() == pytest.approx(math.log(1 / 14), abs=1e-5)


def test_multiple_choice_on_a_hand_made_file(bigram, tmp_path):
    m, tok = bigram
    f = tmp_path / "hand.jsonl"
    rows = [
        {"context": "a b", "choices": ["c", "d"], "label": 0},  # c: ln 1/2 > d: ln 1/14
        {"context": "a", "choices": ["b c", "c"], "label": 1},  # b c: ln 1/4 wins: wrong
        {"context": "a", "choices": ["b c d e", "h"], "label": 1},  # ln 1/16 < ln 1/14; per char 0 wins
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    fmt, ex = load_task_file(f)
    assert fmt == "generic" and len(ex) == 3
    r = evaluate_multiple_choice(m, ex, tok, progress=False)
    L2, L14 = math.log(1 / 2), math.log(1 / 14)
    hand = [[L2, L14], [2 * L2, L14], [4 * L2, L14]]
    for p, h in zip(r.predictions, hand):
        assert p["logprobs"] == pytest.approx(h, abs=1e-4)
    assert [p["pred"] for p in r.predictions] == [0, 0, 1]
    assert [p["pred_norm"] for p in r.predictions] == [0, 0, 0]  # (4 ln 1/2)/7 chars > ln 1/14
    assert r.acc == pytest.approx(2 / 3) and r.acc_norm == pytest.approx(1 / 3)
    # greedy flag: "c" after "a b" is the argmax continuation, "d" is not
    (lp_c, greedy_c), (_, greedy_d) = score_continuations(m, [([0, 1], [2]), ([0, 1], [3])])
    assert greedy_c and not greedy_d and lp_c == pytest.approx(L2, abs=1e-4)


def test_published_formats_parse(tmp_path):
    hs = {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
          "ctx_b": "then", "ctx": "x", "endings": ["a [title] b", "c", "d", "e"], "label": "3"}
    (tmp_path / "hs.jsonl").write_text(json.dumps(hs) + "\n")
    fmt, (e,) = load_task_file(tmp_path / "hs.jsonl")
    assert fmt == "hellaswag" and e.label == 3
    assert e.context == "Removing ice from car: Then, the man writes over the snow. Then"
    assert e.choices[0] == "a. b"
    arc_ai2 = {"id": "q", "question": {"stem": "Which?", "choices": [
        {"text": "x", "label": "A"}, {"text": "y", "label": "B"}]}, "answerKey": "B"}
    arc_hf = {"id": "q", "question": "Which?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]},
              "answerKey": "3"}
    (tmp_path / "arc.jsonl").write_text(json.dumps(arc_ai2) + "\n" + json.dumps(arc_hf) + "\n")
    fmt, (a, b) = load_task_file(tmp_path / "arc.jsonl")
    assert fmt == "arc" and a.context == "Question: Which?\nAnswer:" and (a.label, b.label) == (1, 2)
    piqa = {"goal": "Open a jar", "sol1": "twist", "sol2": "shout"}
    (tmp_path / "valid.jsonl").write_text(json.dumps(piqa) + "\n")
    with pytest.raises(ValueError, match="valid-labels.lst is missing"):
        load_task_file(tmp_path / "valid.jsonl")
    (tmp_path / "valid-labels.lst").write_text("0\n")
    fmt, (p,) = load_task_file(tmp_path / "valid.jsonl")
    assert fmt == "piqa" and p.choices == ["twist", "shout"] and p.label == 0
    (tmp_path / "bad.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match="unrecognised multiple-choice record"):
        load_task_file(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"choices": ["a"], "label": 0}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl:2: not JSON"):
        load_task_file(tmp_path / "broken.jsonl")
    with pytest.raises(ValueError, match="label 5 is not one of its 2 choices"):
        evaluate_multiple_choice(small_model(), [MCExample([1], [[2], [3]], 5)], progress=False)


def test_builtin_task_is_deterministic_and_holds_the_true_continuation(run):
    from deepseek_moe.evaluate import eval_cache

    _, _, ckpt, run_dir = load_checkpoint(run)
    cache = eval_cache(ckpt, run_dir, progress=False)
    a = builtin_task(cache, per_domain=5, context_tokens=16, continuation_tokens=4, seed=1)
    b = builtin_task(cache, per_domain=5, context_tokens=16, continuation_tokens=4, seed=1)
    assert [(e.context, e.choices, e.label) for e in a] == [(e.context, e.choices, e.label) for e in b]
    assert {e.group for e in a} == {"code", "prose"}
    toks = np.asarray(cache.tokens("validation")).tolist()
    for e in a:
        assert len(e.choices) == 4 and all(len(c) == 4 for c in e.choices)
        whole = e.context + e.choices[e.label]
        # the context followed by the labelled choice is a real span of the held-out text
        assert any(toks[i:i + 20] == whole for i in range(len(toks) - 19) if toks[i] == whole[0])
    c = builtin_task(cache, per_domain=5, context_tokens=16, continuation_tokens=4, seed=2)
    assert [e.context for e in c] != [e.context for e in a]
    with pytest.raises(ValueError, match="no built-in task"):
        builtin_task(cache, context_tokens=100_000)


# --- the analyses -----------------------------------------------------------------------------------------
def test_analysis_at_r0_and_trained_k_reproduces_plain_evaluation(run, tmp_path):
    from deepseek_moe.analyze import _sample
    from deepseek_moe.evaluate import eval_cache

    model, _, ckpt, run_dir = load_checkpoint(run)
    cache = eval_cache(ckpt, run_dir, progress=False)
    res = analyze(model, cache, seq_len=64, max_tokens=2048, ks=[1, 3, 5], progress=False)
    plain = evaluate_tokens(model, _sample(cache, "validation", 64, 2048), 64).loss
    assert res.baseline == plain
    assert res.disable_top[0] == {"ratio": 0.0, "disabled": 0, "loss": plain}
    assert [r["disabled"] for r in res.disable_top] == [0, 1, 2, 3, 4]  # 15 experts x r/16, rounded
    assert {r["k"]: r["loss"] for r in res.top_k_sweep}[3] == plain
    assert res.shared["with_shared"] == plain and res.shared["without_shared"] != plain
    ld = res.load
    assert set(ld["domains"]) == {"code", "prose"} and len(ld["entropy"]) == 2
    share = np.asarray(ld["domain_share"])
    assert share.shape == (2, 2, 15) and np.allclose(share.sum(-1), 1.0)
    assert all(0 <= j <= 1 for j in ld["domain_js"])
    paths = plot_analysis(res, tmp_path)
    assert sorted(p.name for p in paths) == ["activated_experts.png", "disable_top_experts.png",
                                             "expert_load_by_domain.png", "moe_paths.png",
                                             "routing_stats.png", "shared_expert.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    text = res.format()
    assert "Fig. 4" in text and "Fig. 5" in text and "shared off, k=4" in text


@pytest.mark.parametrize("preset,norm", [("deepseekmoe-tiny", False), ("gshard-tiny", True),
                                         ("deepseekmoe-tiny", True), ("hash-tiny", False)])
def test_paths_analysis_against_a_direct_computation(preset, norm):
    """``paths``: the residual stream (the block's input plus its attention output), the shared
    experts' output and the gated routed output (by the readable reference dispatch), measured
    by hand on the same batch; the gates' sum is 1 exactly when they are renormalised."""
    from deepseek_moe.analyze import Analysis, _PathProbe
    from deepseek_moe.moe.dispatch import dispatch_reference

    model = small_model(preset, norm_topk_prob=norm)
    blocks = [b for b in model.model.layers if b.is_moe]
    seen: dict = {}
    hooks = []
    for i, b in enumerate(blocks):
        hooks.append(b.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("x", i), a[0])))
        hooks.append(b.self_attn.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("a", i), o)))
        hooks.append(b.mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("h", i), a[0])))
    ids = torch.randint(0, 512, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), _PathProbe(model) as probe:
        model(ids)
    for h in hooks:
        h.remove()
    got = probe.summary(list(range(len(blocks))))

    def rms(t):
        return float(t.float().pow(2).mean().sqrt())

    assert len(got["layers"]) == len(blocks) == 2
    with torch.no_grad():
        for i, b in enumerate(blocks):
            h = seen[("h", i)].reshape(-1, 64)
            assert got["residual_rms"][i] == pytest.approx(rms(seen[("x", i)] + seen[("a", i)]), rel=1e-5)
            shared = b.mlp.shared_experts(h) if b.mlp.shared_experts is not None else torch.zeros_like(h)
            assert got["shared_rms"][i] == pytest.approx(rms(shared), rel=1e-5)
            r = b.mlp.gate(h, ids.reshape(-1))
            routed, _ = dispatch_reference(h, r.topk_ids_TK, r.topk_weights_TK, b.mlp.experts, None)
            assert got["routed_rms"][i] == pytest.approx(rms(routed), rel=1e-4)
            assert got["gate_sum"][i] == pytest.approx(float(r.topk_weights_TK.sum(-1).mean()), rel=1e-5)
            hashed = preset.startswith("hash")
            assert (got["gate_sum"][i] == pytest.approx(1.0)) == (norm or hashed)
            norm_e = None if hashed else pytest.approx(float(b.mlp.gate.weight.norm(dim=-1).mean()))
            assert got["router_norm"][i] == norm_e
    assert (got["shared_rms"][0] == 0) == preset.startswith(("gshard", "hash"))
    assert "shared vs routed" in Analysis("m", 15, 3, 1, 51, 1.0, paths=got).format()


def test_js_divergence():
    from deepseek_moe.analyze import js_divergence_bits

    same = np.array([[1.0, 2, 3], [2.0, 4, 6]])
    assert js_divergence_bits(same, np.array([1.0, 1])) == pytest.approx(0.0, abs=1e-12)
    disjoint = np.array([[1.0, 0, 0], [0, 5.0, 0]])
    assert js_divergence_bits(disjoint, np.array([1.0, 1])) == pytest.approx(1.0)


# --- the commands ----------------------------------------------------------------------------------------
def test_eval_and_analyze_commands(run, tmp_path, capsys):
    hand = tmp_path / "mine.jsonl"
    hand.write_text(json.dumps({"context": "def", "choices": [" main(", " x"], "label": 0}) + "\n")
    out = tmp_path / "ev"
    assert main(["eval", str(run), "--out", str(out), "--no-progress", "--mc-per-domain", "3",
                 "--tasks", "continuation", f"mine={hand}"]) == 0
    text = capsys.readouterr().out
    assert "bits/byte" in text and "continuation" in text and "mine (generic)" in text
    res = json.loads((out / "eval.json").read_text())
    assert set(res["loss"]["splits"]) == {"validation", "test"}
    assert res["multiple_choice"]["continuation"]["n"] == 6
    assert main(["analyze", str(run), "--out", str(tmp_path / "an"), "--no-progress",
                 "--max-tokens", "1024", "--k", "2", "3"]) == 0
    text = capsys.readouterr().out
    assert "disable top routed experts" in text and "routing entropy" in text
    assert (tmp_path / "an/analysis.json").is_file() and (tmp_path / "an/expert_load_by_domain.png").is_file()


def test_command_errors(run, tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err
    # an analysis of a dense checkpoint is refused before any data work
    from deepseek_moe.checkpoint import save_pretrained

    save_pretrained(small_model("dense-tiny"), tmp_path / "dense")
    assert main(["analyze", str(tmp_path / "dense"), "--data-dir", str(tmp_path / "nodata")]) == 2
    assert "dense (no MoE layers)" in capsys.readouterr().err
    assert not (tmp_path / "nodata").exists()
    assert main(["eval", str(run), "--splits", "--tasks", "x=" + str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_refuses_characters_the_tokenizer_cannot_encode(run, tmp_path, capsys):
    from tokenizers import Tokenizer, models

    # character-level BPE over ASCII letters with an unknown token: 'ö' has no token
    vocab = {"[UNK]": 0, " ": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="[UNK]"))
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tok.json"))
    assert main(["generate", str(run), "--tokenizer", str(tmp_path / "tok.json"),
                 "--prompt", "hello wörld", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "cannot encode" in err and "'ö' (U+00F6)" in err
    assert main(["generate", str(run), "--tokenizer", str(tmp_path / "tok.json"),
                 "--prompt", "hello world", "--max-new-tokens", "2", "--temperature", "0"]) == 0
