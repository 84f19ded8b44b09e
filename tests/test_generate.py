"""Generation: the KV cache against full forwards, batching with left padding, sampling, errors."""

from __future__ import annotations

import pytest
import torch

from deepseek_moe.generate import (
    IncrementalDecoder,
    filter_logits,
    generate,
    generate_text,
)
from deepseek_moe.model import DeepseekForCausalLM, KVCache
from deepseek_moe.presets import get_config

V = 97


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matrices gain nothing from threads, and on a busy machine OpenMP's spinning workers
    # can make each op thousands of times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small(name: str = "tiny", **kw) -> DeepseekForCausalLM:
    base = dict(vocab_size=V, num_hidden_layers=2, first_k_dense_replace=1)
    if name != "tiny":
        base.pop("first_k_dense_replace")
    base.update(kw)
    torch.manual_seed(0)
    # A larger init than the default 0.006, so that logits differ enough to make argmax stable.
    m = DeepseekForCausalLM(get_config(name, **base))
    m.init_weights(std=0.1)
    return m.eval()


def full_logits(m: DeepseekForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0]  # (S, V)


@pytest.mark.parametrize("name", ["tiny", "hash-tiny", "dense-tiny"])
def test_cache_equals_full_forward_single(name):
    m = small(name)
    ids = torch.randint(0, V, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    cache = KVCache.for_model(m, 1, len(ids))
    with torch.no_grad():
        steps = [m(torch.tensor([ids[:6]]), cache=cache).logits[0]]
        steps += [m(torch.tensor([[t]]), cache=cache).logits[0] for t in ids[6:]]
    assert cache.length == len(ids) and cache.all_real  # every step after the prompt unmasked
    torch.testing.assert_close(torch.cat(steps), full_logits(m, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "hash-tiny", "dense-tiny"])
def test_cache_equals_full_forward_batched_left_padded(name):
    m = small(name)
    g = torch.Generator().manual_seed(2)
    lengths, n_new = [5, 9, 1], 4
    rows = [torch.randint(1, V, (n + n_new,), generator=g).tolist() for n in lengths]
    S = max(lengths)
    ids = torch.zeros(len(rows), S, dtype=torch.long)  # pad id 0, left padding
    mask = torch.zeros(len(rows), S, dtype=torch.bool)
    for b, (r, n) in enumerate(zip(rows, lengths)):
        ids[b, S - n:], mask[b, S - n:] = torch.tensor(r[:n]), True
    cache = KVCache.for_model(m, len(rows), S + n_new)
    with torch.no_grad():
        prefill = m(ids, cache=cache, attention_mask=mask).logits  # (B, S, V)
        steps = [m(torch.tensor([[r[n + i]] for r, n in zip(rows, lengths)]), cache=cache).logits
                 for i in range(n_new)]
    assert not cache.all_real  # padding in the cache: every step masked
    cached = torch.cat([prefill] + steps, dim=1)
    for b, (r, n) in enumerate(zip(rows, lengths)):
        got = cached[b, S - n:]  # this row's real positions
        torch.testing.assert_close(got, full_logits(m, r), rtol=0, atol=1e-5, msg=f"row {b}")


def test_attention_mask_without_cache_equals_unpadded():
    m = small()
    r = [3, 1, 4, 1, 5]
    ids = torch.tensor([[0, 0, 0] + r, [9, 2, 6, 5, 3, 5, 8, 9]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8], dtype=torch.bool)
    with torch.no_grad():
        out = m(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0, 3:], full_logits(m, r), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], full_logits(m, ids[1].tolist()), rtol=0, atol=1e-5)


def test_explicit_positions():
    m = small()
    x = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    with torch.no_grad():
        want = m(x).logits
        torch.testing.assert_close(m(x, positions=torch.arange(5)).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(m(x, positions=torch.arange(5).expand(2, 5)).logits, want,
                                   rtol=0, atol=1e-6)
        # RoPE is relative: shifting every position leaves causal logits unchanged.
        torch.testing.assert_close(m(x, positions=torch.arange(5) + 100).logits, want,
                                   rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="positions"):
            m(x, positions=torch.arange(4))


def test_greedy_equals_argmax_of_full_forwards():
    m = small()
    prompts = [[5, 17, 3, 88, 42], [7, 1]]
    got = generate(m, prompts, 6, greedy=True)
    for p, g in zip(prompts, got):
        seq = list(p)
        for _ in range(6):
            seq.append(int(full_logits(m, seq)[-1].argmax()))
        assert g == seq[len(p):]
    assert generate(m, prompts, 6, temperature=0) == got


def test_stop_tokens_end_a_row_and_others_continue():
    m = small()
    prompts = [[5, 17, 3, 88, 42], [7, 1], [60, 61, 62]]
    free = generate(m, prompts, 8, greedy=True)
    stop = free[0][2]
    want = [f[: f.index(stop) + 1] if stop in f else f for f in free]
    streamed: list[list[int]] = [[] for _ in prompts]
    got = generate(m, prompts, 8, greedy=True, stop_tokens=[stop],
                   stream=lambda row, t: streamed[row].append(t))
    assert got == want and streamed == want
    assert got[0][-1] == stop and len(got[0]) <= 3
    assert any(len(g) == 8 for g in got)  # at least one row ran on to the end
    # Every row stopping at once ends generation early.
    assert generate(m, [[5, 17, 3, 88, 42]], 8, greedy=True, stop_tokens=free[0][0]) == [[free[0][0]]]


def test_top_k_1_and_tiny_top_p_equal_greedy():
    m = small()
    prompts = [[5, 17, 3], [7, 1, 2, 9, 4]]
    greedy = generate(m, prompts, 5, greedy=True)
    assert generate(m, prompts, 5, temperature=1.5, top_k=1, seed=3) == greedy
    assert generate(m, prompts, 5, temperature=1.5, top_p=1e-6, seed=3) == greedy


def test_seeded_sampling_is_reproducible():
    m = small()
    m.init_weights()  # the default std 0.006: near-uniform logits, so samples differ between seeds
    kw = dict(temperature=1.0, top_k=50, top_p=0.95)
    a = generate(m, [[1, 2, 3], [4]], 10, seed=123, **kw)
    assert a == generate(m, [[1, 2, 3], [4]], 10, seed=123, **kw)
    assert a != generate(m, [[1, 2, 3], [4]], 10, seed=124, **kw)
    assert all(len(r) == 10 for r in a)


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    inf = float("-inf")
    kept = lambda out: (out != inf)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, False, True, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.7)) == [True, False, True, False]
    assert kept(filter_logits(logits, top_p=0.9)) == [True, False, True, True]
    assert kept(filter_logits(logits, top_p=1.0)) == [True] * 4


def test_bad_arguments():
    m = small()
    cases = [
        (dict(prompts=[]), "non-empty list"),
        (dict(prompts=[1, 2, 3]), r"for one prompt pass \[ids\]"),
        (dict(prompts=[[1], []]), "prompt 1 is empty"),
        (dict(prompts=[[1, V]]), f"token id {V} is out of range"),
        (dict(prompts=[[1, -1]]), "token id -1 is out of range"),
        (dict(prompts=[[1.5]]), "integer token ids"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=1020), "exceeds max_position_embeddings 1024"),
        (dict(stop_tokens=[V + 3]), "stop_tokens"),
        (dict(pad_id=V), "pad_id"),
    ]
    for override, match in cases:
        kw = dict(prompts=[[1, 2, 3, 4, 5]], max_new_tokens=2) | override
        with pytest.raises(ValueError, match=match):
            generate(m, **kw)
    assert generate(m, [[1, 2]], 0) == [[]]


def test_cache_errors():
    m = small()
    cache = KVCache.for_model(m, 1, 4)
    with torch.no_grad():
        m(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(ValueError, match="cannot take input"):
            m(torch.tensor([[1, 2]]), cache=cache)
        with pytest.raises(ValueError, match="cannot take input"):
            m(torch.tensor([[1], [2]]), cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        KVCache.for_model(m, 1, 1025)
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))


@pytest.fixture(scope="module")
def tokenizer():
    from deepseek_moe.data.tokenizer import train_tokenizer

    text = ["héllo wörld, 世界 ", "the quick brown fox jumps over the lazy dog "] * 20
    return train_tokenizer(text, vocab_size=300)


def test_incremental_decoder_handles_multibyte_tokens(tokenizer):
    from tokenizers import pre_tokenizers

    text = "héllo 世界 and the lazy 🦊"
    # One token per byte, so that every multi-byte character is cut across tokens.
    byte_chars = "".join(s for s, _ in pre_tokenizers.ByteLevel(add_prefix_space=False)
                         .pre_tokenize_str(text))
    ids = [tokenizer.token_to_id(c) for c in byte_chars]
    assert len(ids) == len(text.encode("utf-8")) and None not in ids
    dec = IncrementalDecoder(tokenizer)
    pieces = [dec.add(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_generate_text_streams_and_validates(tokenizer):
    from deepseek_moe.data.tokenizer import eos_id

    m = small(vocab_size=tokenizer.get_vocab_size())
    streamed: dict[int, str] = {}
    out = generate_text(m, tokenizer, ["héllo", "the quick"], 12, greedy=True,
                        stream=lambda row, s: streamed.__setitem__(row, streamed.get(row, "") + s))
    assert isinstance(out, list) and len(out) == 2
    assert [streamed.get(i, "") for i in range(2)] == out
    ids = generate(m, [tokenizer.encode("héllo").ids], 12, greedy=True,
                   stop_tokens=[eos_id(tokenizer)])[0]
    ids = [i for i in ids if i != eos_id(tokenizer)]
    assert out[0] == tokenizer.decode(ids)
    assert generate_text(m, tokenizer, "héllo", 12, greedy=True) == out[0]
    with pytest.raises(ValueError, match="encodes to no tokens"):
        generate_text(m, tokenizer, "", 4)
    with pytest.raises(ValueError, match="vocab_size"):
        generate_text(small(), tokenizer, "the quick", 4)


def test_generate_command_does_not_import_evaluation(tokenizer, tmp_path):
    """`deepseek-moe generate` loads a checkpoint and reaches the model's logits without importing
    ``deepseek_moe.evaluate`` (held-out evaluation and its data pipeline). A fresh interpreter,
    since this one has imported everything by now."""
    import subprocess
    import sys

    from deepseek_moe.checkpoint import save_pretrained
    from deepseek_moe.data.tokenizer import save_tokenizer

    tok_file = tmp_path / "tokenizer.json"
    save_tokenizer(tokenizer, tok_file)
    ckpt = tmp_path / "ckpt"
    save_pretrained(small(vocab_size=tokenizer.get_vocab_size()), ckpt,
                    extra_files={"tokenizer.json": tok_file})
    code = ("import sys\n"
            "from deepseek_moe.cli import main\n"
            f"rc = main(['generate', {str(ckpt)!r}, '--prompt', 'the quick', '--max-new-tokens', '3',"
            " '--temperature', '0'])\n"
            "print('rc', rc, 'evaluate imported', 'deepseek_moe.evaluate' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the quick")
    assert r.stdout.rstrip().endswith("rc 0 evaluate imported False"), r.stdout
