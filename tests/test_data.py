"""Data pipeline: corpus sources, dedup and splits, tokenizer, token cache, packing, sampling.

Everything runs on small synthetic corpora in tmp_path (``sources=()`` + ``paths``); only the
smoke test touches the real default sources, and only their first documents.
"""

from __future__ import annotations

import gzip
import itertools
import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

import deepseek_moe.data.corpus as corpus_mod
import deepseek_moe.data.prepare as prepare_mod
from deepseek_moe.data import (
    EOS_TOKEN,
    CacheError,
    CorpusError,
    CorpusStats,
    Document,
    PackedSequences,
    SequenceSampler,
    TokenCache,
    TokenizerError,
    batch,
    build_token_cache,
    eos_id,
    iter_documents,
    load_tokenizer,
    prepare_data,
    save_tokenizer,
    split_of,
    train_tokenizer,
)
from deepseek_moe.data.corpus import shakespeare_scenes
from deepseek_moe.data.prepare import tokenizer_sample_fractions

WORDS = ("the quick brown fox jumps over lazy dog def return class import self lambda yield "
         "while for in if else elif try except finally with as async await").split()


def _text(rng: random.Random, n_words: int = 40) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n"


def _make_corpus(root: Path, n: int = 120, seed: int = 0) -> Path:
    """``n`` distinct small text files under ``root``."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i:04d}.txt").write_text(f"document {i}\n" + _text(rng))
    return root


@pytest.fixture(scope="module")
def code_text() -> list[str]:
    """A few real stdlib modules: enough text for a 512-token BPE in well under a second."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ("textwrap.py", "argparse.py", "json/decoder.py", "dataclasses.py", "string.py")
    return [(stdlib / name).read_text(encoding="utf-8") for name in names]


@pytest.fixture(scope="module")
def small_tok(code_text):
    return train_tokenizer(code_text, vocab_size=512)


# --------------------------------------------------------------------------------------------
# Corpus


def test_dedup_across_sources(tmp_path):
    a = _make_corpus(tmp_path / "a", n=5)
    b = tmp_path / "b"
    b.mkdir()
    dup = (a / "doc0001.txt").read_text()
    (b / "copy.txt").write_text(dup)
    (b / "records.jsonl").write_text(json.dumps({"text": dup}) + "\n" + json.dumps({"text": "fresh"}) + "\n")
    stats = CorpusStats()
    docs = list(iter_documents(sources=(), paths=[a, b], stats=stats))
    texts = [d.text for d in docs]
    assert len(texts) == len(set(texts)) == 6
    assert stats.domains["user"].duplicates == 2
    assert stats.domains["user"].documents == 6
    assert docs[0].source.endswith("doc0000.txt")  # sorted order


def test_split_of_is_deterministic_and_content_based():
    rng = random.Random(1)
    texts = [f"{i} {_text(rng, 5)}" for i in range(20000)]
    splits = [split_of(t) for t in texts]
    assert splits == [split_of(t) for t in texts]
    counts = {s: splits.count(s) for s in ("train", "validation", "test")}
    # 0.5% each of 20000 = 100; binomial sd ~10
    assert 50 < counts["validation"] < 150 and 50 < counts["test"] < 150
    assert counts["train"] == 20000 - counts["validation"] - counts["test"]


def test_split_fractions_are_adjustable_for_small_corpora(tmp_path):
    rng = random.Random(2)
    texts = [f"{i} {_text(rng, 5)}" for i in range(2000)]
    splits = [split_of(t, validation_fraction=0.1, test_fraction=0.05) for t in texts]
    assert 120 < splits.count("validation") < 280 and 50 < splits.count("test") < 150
    # a default-validation text stays held out when the fractions grow (the same hash thresholds)
    assert all(split_of(t, 0.1, 0.05) == "validation" for t in texts if split_of(t) == "validation")
    with pytest.raises(ValueError, match="fraction"):
        split_of("x", validation_fraction=0.7, test_fraction=0.4)
    root = _make_corpus(tmp_path / "small", n=60)
    _, cache = prepare_data(tmp_path / "data", vocab_size=300, sources=(), paths=[root], progress=False,
                            validation_fraction=0.2, test_fraction=0.1)
    assert len(cache.documents("validation")) > 0 and len(cache.documents("test")) > 0
    assert cache.meta["split_fractions"] == {"validation": 0.2, "test": 0.1}


def test_same_content_never_in_two_splits(tmp_path, small_tok):
    root = _make_corpus(tmp_path / "c", n=400)
    for i in range(50):  # the same texts again under other names
        (root / f"z_copy{i}.txt").write_text((root / f"doc{i:04d}.txt").read_text())
    stats = CorpusStats()
    docs = iter_documents((), [root], stats=stats)
    cache = build_token_cache(tmp_path / "cache", docs, small_tok, progress=False)
    assert stats.domains["user"].duplicates == 50
    seen: dict[str, str] = {}
    for split in cache.splits:
        toks = cache.tokens(split)
        for s, e in cache.documents(split):
            text = small_tok.decode(toks[s:e].tolist())
            assert seen.setdefault(text, split) == split
    assert len(seen) == 400


def test_undecodable_and_binary_files_are_skipped_and_counted(tmp_path):
    root = _make_corpus(tmp_path / "u", n=3)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "binary.bin").write_bytes(b"\x00\x01\x02abc")
    stats = CorpusStats()
    docs = list(iter_documents((), [root], stats=stats))
    assert len(docs) == 3
    assert stats.domains["user"].undecodable == 2
    assert "undecodable" in stats.format()


def test_empty_corpus_is_a_clear_error(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "x.txt").write_bytes(b"\xff\xfe\xfa")
    (root / "blank.txt").write_text("   \n")
    with pytest.raises(CorpusError, match=r"empty corpus.*bad.*1 undecodable.*1 empty"):
        list(iter_documents((), [root]))
    with pytest.raises(CorpusError, match="empty corpus"):
        list(iter_documents((), ()))
    with pytest.raises(CorpusError, match="unknown corpus source 'nope'"):
        iter_documents(("nope",))
    with pytest.raises(CorpusError, match="not found"):
        iter_documents((), [tmp_path / "missing"])
    with pytest.raises(CorpusError, match="empty corpus"):
        prepare_data(tmp_path / "data", vocab_size=300, sources=(), paths=[root], progress=False)


def test_jsonl_records_domains_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    lines = [json.dumps({"text": "alpha"}), "", json.dumps({"text": "beta", "domain": "law"})]
    good.write_text("\n".join(lines) + "\n")
    docs = list(iter_documents((), [good]))
    assert [(d.text, d.domain) for d in docs] == [("alpha", "user"), ("beta", "law")]
    assert docs[1].source.endswith("good.jsonl:3")
    # a custom field, and name=path labelling
    custom = tmp_path / "c.jsonl"
    custom.write_text(json.dumps({"body": "gamma"}) + "\n")
    docs = list(iter_documents((), [f"news={custom}"], text_field="body"))
    assert [(d.text, d.domain) for d in docs] == [("gamma", "news")]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_documents((), [bad]))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CorpusError, match=r"nofield\.jsonl:2: .*'text'"):
        list(iter_documents((), [nofield]))


def test_debian_and_shakespeare_readers(tmp_path, monkeypatch):
    fort = tmp_path / "fortunes"
    fort.mkdir()
    (fort / "science").write_text("One fortune.\n%\nTwo\n  lines.\n%\n")
    (fort / "science.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    (fort / "science.u8").symlink_to(fort / "science")
    dictd = tmp_path / "dictd"
    dictd.mkdir()
    entries = [b"Apple \\Ap\"ple\\ n.\n   1. A fruit.", b"Bad \\Bad\\ a.\n   Stock market\x92s drop.",
               b"Cat \\Cat\\ n.\n   1. An animal."]
    with gzip.open(dictd / "gcide.dict.dz", "wb") as g:
        g.write(b"\n\n".join(entries) + b"\n")
    wn = tmp_path / "wordnet"
    wn.mkdir()
    (wn / "data.noun").write_text(
        "  1 This software and database is being provided to you\n"
        "00001740 03 n 02 entity 0 physical_entity 0 000 | that which is perceived to exist  \n")
    monkeypatch.setattr(corpus_mod, "FORTUNES_DIR", fort)
    monkeypatch.setattr(corpus_mod, "DICTD_DIR", dictd)
    monkeypatch.setattr(corpus_mod, "WORDNET_DIR", wn)
    stats = CorpusStats()
    docs = list(iter_documents(("debian",), stats=stats))
    by_domain = {d: [x.text for x in docs if x.domain == d] for d in ("fortunes", "dictionary", "wordnet")}
    assert by_domain["fortunes"] == ["One fortune.", "Two\n  lines."]
    assert len(by_domain["dictionary"]) == 1 and "Apple" in by_domain["dictionary"][0]
    assert "Cat" in by_domain["dictionary"][0] and "Stock" not in by_domain["dictionary"][0]
    assert stats.domains["dictionary"].undecodable == 1  # one entry, not the whole file
    assert by_domain["wordnet"] == ["entity, physical entity (n.): that which is perceived to exist"]

    play = "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\nWho's there?\n\n### SCENE II. A room.\n\nSo.\n"
    scenes = shakespeare_scenes(play)
    assert scenes == ["# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\nWho's there?\n\n",
                      "# Hamlet\n\n### SCENE II. A room.\n\nSo.\n"]


def test_default_sources_smoke():
    """The first documents of the machine's own sources are real text with the right domain (the
    pinned ones: test_run_safety.py)."""
    expected = {"stdlib": "code", "site-packages": "code"}
    for source, domain in expected.items():
        docs = list(itertools.islice(iter_documents((source,)), 50))
        assert len(docs) == 50 and all(d.domain == domain for d in docs)
    assert "torch" in "".join(d.source for d in itertools.islice(iter_documents(("site-packages",)), 5000))
    stats = CorpusStats()
    try:
        docs = list(itertools.islice(iter_documents(("debian",), stats=stats), 50))
        assert docs and {d.domain for d in docs} <= {"fortunes", "dictionary", "wordnet"}
    except CorpusError as e:  # none of the Debian text packages is installed here
        assert "not installed: fortunes, dictionary, wordnet" in str(e)


# --------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip_vocab_and_eos(small_tok, tmp_path):
    assert small_tok.get_vocab_size() == 512
    assert eos_id(small_tok) == small_tok.token_to_id(EOS_TOKEN) == 0
    sample = "def grüß(x: int) -> str:\n\treturn f'{x} → 日本語 😀'  # naïve\r\n    \n"
    assert small_tok.decode(small_tok.encode(sample).ids) == sample
    save_tokenizer(small_tok, tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path)  # a folder holding tokenizer.json works too
    assert again.encode(sample).ids == small_tok.encode(sample).ids
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["x"], vocab_size=100)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ this is not json")
    with pytest.raises(TokenizerError, match="tokenizer.json is not a valid tokenizer.json"):
        load_tokenizer(bad)


# --------------------------------------------------------------------------------------------
# Cache


def test_cache_puts_eos_between_documents(tmp_path, small_tok):
    docs = [Document("first doc", "a", "x"), Document("literal <|endoftext|> inside", "b", "y"),
            Document("third ü", "a", "z")]
    cache = build_token_cache(tmp_path / "c", docs, small_tok, progress=False)
    eos = eos_id(small_tok)
    assert cache.tokens("train").dtype == np.uint16
    total = 0
    for split in cache.splits:
        toks = np.asarray(cache.tokens(split))
        bounds = cache.documents(split)
        total += len(bounds)
        if len(bounds):
            assert bounds[0][0] == 0 and bounds[-1][1] == len(toks) - 1
        for (s, e), dom in zip(bounds, cache.document_domains(split)):
            assert toks[e] == eos and eos not in toks[s:e]  # the literal text is not a real EOS
            assert cache.domains[dom] in ("a", "b")
        assert sum(cache.domain_token_counts()[split].values()) == cache.num_tokens(split)
    assert total == 3
    texts = sorted(small_tok.decode(np.asarray(cache.tokens(split)[s:e]).tolist())
                   for split in cache.splits for s, e in cache.documents(split))
    assert texts == sorted(d.text for d in docs)
    assert sum(int((cache.domain_tokens(split, "a") == eos).sum()) for split in cache.splits) == 2


def test_interrupted_build_leaves_no_valid_cache(tmp_path, small_tok):
    good = [Document(f"doc {i}", "a", str(i)) for i in range(20)]
    cache_dir = tmp_path / "c"
    build_token_cache(cache_dir, good, small_tok, progress=False)
    TokenCache.open(cache_dir)  # valid

    def exploding():
        yield from good[:5]
        raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        build_token_cache(cache_dir, exploding(), small_tok, progress=False)
    with pytest.raises(CacheError, match="meta.json is missing"):
        TokenCache.open(cache_dir)
    assert not [p for p in cache_dir.iterdir() if ".tmp" in p.name]


def test_prepare_data_reuses_and_rebuilds(tmp_path, monkeypatch):
    root = _make_corpus(tmp_path / "corpus", n=150)
    data = tmp_path / "data"
    builds = []
    real_build = prepare_mod.build_token_cache
    monkeypatch.setattr(prepare_mod, "build_token_cache",
                        lambda *a, **k: builds.append(1) or real_build(*a, **k))

    tok, cache = prepare_data(data, vocab_size=300, sources=(), paths=[root], progress=False)
    assert tok.get_vocab_size() == 300 and len(builds) == 1
    assert cache.corpus_stats().domains["user"].documents == 150
    (tok_file,) = (data / "tokenizers").glob("*/tokenizer.json")
    tok_mtime = tok_file.stat().st_mtime_ns
    meta_mtime = (cache.path / "meta.json").stat().st_mtime_ns

    tok2, cache2 = prepare_data(data, vocab_size=300, sources=(), paths=[root], progress=False)
    assert len(builds) == 1 and (cache2.path / "meta.json").stat().st_mtime_ns == meta_mtime
    assert cache2.path == cache.path and tok2.to_str() == tok.to_str()

    (root / "new.txt").write_text("a brand new document\n")  # input changed: cache rebuilt ...
    _, cache3 = prepare_data(data, vocab_size=300, sources=(), paths=[root], progress=False)
    assert len(builds) == 2 and cache3.corpus_stats().domains["user"].documents == 151
    assert tok_file.stat().st_mtime_ns == tok_mtime  # ... token ids kept
    # ... into a folder of its own: the first corpus's cache is still there, unchanged
    assert cache3.path != cache.path and (cache.path / "meta.json").stat().st_mtime_ns == meta_mtime

    tok4, _ = prepare_data(data, vocab_size=320, sources=(), paths=[root], progress=False)  # new vocab
    assert tok4.get_vocab_size() == 320 and len(builds) == 3
    assert tok_file.stat().st_mtime_ns == tok_mtime  # the 300-token BPE is kept beside it

    tok4_file = next(p for p in (data / "tokenizers").glob("*/tokenizer.json") if p != tok_file)
    tok4_file.write_text("garbage")  # a corrupted own tokenizer is retrained
    tok5, _ = prepare_data(data, vocab_size=320, sources=(), paths=[root], progress=False)
    assert tok5.to_str() == tok4.to_str()

    # an explicit tokenizer file is used as is, and a broken one is a clear error
    save_tokenizer(tok, tmp_path / "mine.json")
    tok6, _ = prepare_data(data, sources=(), paths=[root], tokenizer_path=tmp_path / "mine.json",
                           progress=False)
    assert tok6.get_vocab_size() == 300
    with pytest.raises(TokenizerError, match="not found"):
        prepare_data(data, sources=(), paths=[root], tokenizer_path=tmp_path / "absent.json", progress=False)


def test_prepare_data_max_documents_interleaves(tmp_path):
    a = _make_corpus(tmp_path / "a", n=30, seed=1)
    b = _make_corpus(tmp_path / "b", n=30, seed=2)
    _, cache = prepare_data(tmp_path / "data", vocab_size=300, sources=(), paths=[f"x={a}", f"y={b}"],
                            progress=False, max_documents=10)
    stats = cache.corpus_stats()
    assert stats.total().documents == 10
    # read round-robin, so a small cap still samples every source
    assert stats.domains["x"].documents == stats.domains["y"].documents == 5


def test_tokenizer_sample_fractions():
    stats = CorpusStats()
    for name, mb in (("code", 160), ("dictionary", 40), ("shakespeare", 5), ("fortunes", 2.5)):
        stats.domain(name).bytes = int(mb * 1e6)
    f = tokenizer_sample_fractions(stats, 50_000_000)
    alloc = {d: f[d] * stats.domains[d].bytes for d in f}
    assert abs(sum(alloc.values()) - 50e6) < 1e3
    assert f["fortunes"] == 1.0 and f["shakespeare"] == 1.0 and f["code"] < f["dictionary"] < 1.0
    assert tokenizer_sample_fractions(stats, 10**12) == {d: 1.0 for d in f}


# --------------------------------------------------------------------------------------------
# Packing and sampling


def test_packed_sequences_windows():
    ds = PackedSequences(np.arange(103, dtype=np.uint16), seq_len=10)
    assert len(ds) == 10
    x = ds[3]
    assert x.dtype == torch.long and x.tolist() == list(range(30, 40))
    assert ds[-1].tolist() == list(range(90, 100))
    with pytest.raises(IndexError):
        ds[10]


def test_sequence_sampler_deterministic_resumable_and_covering():
    s = SequenceSampler(37, seed=5)
    assert s.indices(0, 10) + s.indices(10, 10) == s.indices(0, 20)
    assert SequenceSampler(37, seed=5).indices(30, 20) == s.indices(30, 20)  # fresh object, same order
    assert sorted(s.indices(0, 37)) == list(range(37))
    assert sorted(s.indices(37, 37)) == list(range(37))
    assert s.indices(0, 37) != s.indices(37, 37)  # a new order each epoch
    assert SequenceSampler(37, seed=6).indices(0, 37) != s.indices(0, 37)
    assert s.epoch_of(36) == 0 and s.epoch_of(37) == 1
    assert s.indices(0, 100) == s.indices(0, 37) + s.indices(37, 37) + s.indices(74, 26)
    with pytest.raises(ValueError):
        SequenceSampler(0, seed=0)


def test_batch_helper():
    ds = PackedSequences(np.arange(200, dtype=np.uint32), seq_len=8)
    s = SequenceSampler(len(ds), seed=0)
    x = batch(ds, s, position=4, batch_size=3)
    assert x.shape == (3, 8) and x.dtype == torch.long
    assert [row[0].item() // 8 for row in x] == s.indices(4, 3)
