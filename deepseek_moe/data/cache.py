"""Tokenized corpus cache: per-split memory-mapped token files, built once and reused.

Layout of a cache folder::

    meta.json              written last: a folder without it is not a cache (build interrupted)
    {split}.bin            the split's tokens, documents back to back, EOS after each one;
                           uint16 when the vocabulary fits, else uint32
    {split}.docs.npy       int64 [n_docs, 2]: start, end of each document (end excludes its EOS)
    {split}.domains.npy    uint16 [n_docs]: index into meta["domains"]

The per-document arrays are what per-domain evaluation needs; the flat token file is what
packing into fixed-length training sequences needs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from ..tables import format_table
from .corpus import (SPLITS, TEST_FRACTION, VALIDATION_FRACTION, CorpusStats, Document, check_fractions,
                     content_hash, split_of_hash)
from .tokenizer import eos_id, tokenizer_sha256

CACHE_FORMAT = 1
META = "meta.json"
# Documents per encode_batch call are grouped up to this many characters: large enough that both
# cores stay busy, small enough that memory stays flat.
BATCH_CHARS = 4 << 20
BATCH_DOCS = 2048

PathLike = Union[str, "os.PathLike[str]"]


class CacheError(ValueError):
    """A cache folder is missing, incomplete (interrupted build) or inconsistent."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class TokenCache:
    """A built cache folder. Open with ``TokenCache.open``; build with ``build_token_cache``."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = path
        self.meta = meta
        self.dtype = np.dtype(meta["dtype"])
        self._tokens: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, cache_dir: PathLike) -> "TokenCache":
        """Open a complete cache; ``CacheError`` when it is missing, interrupted or truncated."""
        path = Path(cache_dir)
        meta_path = path / META
        if not meta_path.is_file():
            raise CacheError(f"no complete token cache in {path}: {META} is missing "
                             "(never built, or the build was interrupted)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CacheError(f"{meta_path} is unreadable: {e}") from None
        if meta.get("format") != CACHE_FORMAT:
            raise CacheError(f"{meta_path}: cache format {meta.get('format')!r}, expected {CACHE_FORMAT}")
        cache = cls(path, meta)
        for split in cache.splits:
            f = path / f"{split}.bin"
            want = meta["splits"][split]["tokens"] * cache.dtype.itemsize
            if not f.is_file() or f.stat().st_size != want:
                raise CacheError(f"{f} is missing or has the wrong size (expected {want} bytes)")
        return cache

    # -- metadata --------------------------------------------------------------------------
    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.meta["splits"])

    @property
    def domains(self) -> list[str]:
        return list(self.meta["domains"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("fingerprint", ""))

    def num_tokens(self, split: str) -> int:
        return int(self.meta["splits"][split]["tokens"])

    def domain_token_counts(self) -> dict[str, dict[str, int]]:
        """{split: {domain: tokens}}, EOS included, so each split's counts sum to its length."""
        return {s: {d: v["tokens"] for d, v in m["domains"].items()} for s, m in self.meta["splits"].items()}

    def corpus_stats(self) -> Optional[CorpusStats]:
        c = self.meta.get("corpus")
        return None if c is None else CorpusStats.from_dict(c)

    # -- data ------------------------------------------------------------------------------
    def _check_split(self, split: str) -> None:
        if split not in self.meta["splits"]:
            raise KeyError(f"unknown split {split!r}; this cache has {', '.join(self.splits)}")

    def tokens(self, split: str) -> np.ndarray:
        """The split's token stream (read-only memmap; a plain empty array for an empty split)."""
        self._check_split(split)
        if split not in self._tokens:
            n = self.num_tokens(split)
            if n == 0:  # numpy cannot memory-map an empty file
                self._tokens[split] = np.zeros(0, dtype=self.dtype)
            else:
                self._tokens[split] = np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r",
                                                shape=(n,))
        return self._tokens[split]

    def documents(self, split: str) -> np.ndarray:
        """int64 [n_docs, 2]: token start and end (exclusive, EOS not included) of each document."""
        self._check_split(split)
        return np.load(self.path / f"{split}.docs.npy", mmap_mode="r")

    def document_domains(self, split: str) -> np.ndarray:
        """uint16 [n_docs]: each document's index into ``domains``."""
        self._check_split(split)
        return np.load(self.path / f"{split}.domains.npy", mmap_mode="r")

    def domain_tokens(self, split: str, domain: str) -> np.ndarray:
        """The documents of one domain back to back, EOS after each (for per-domain evaluation)."""
        if domain not in self.meta["domains"]:
            raise KeyError(f"unknown domain {domain!r}; this cache has {', '.join(self.domains)}")
        docs = self.documents(split)
        sel = np.asarray(self.document_domains(split)) == self.meta["domains"].index(domain)
        toks = self.tokens(split)
        parts = [toks[s:e + 1] for s, e in docs[sel]]  # e + 1: keep the EOS that follows
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def format(self) -> str:
        """Per-domain table: documents, MB, skipped files, tokens per split."""
        stats = self.corpus_stats() or CorpusStats()
        counts = self.domain_token_counts()
        header = ("domain", "documents", "MB", "dup", "undecodable")
        header += tuple(f"{s} tokens" for s in self.splits)
        rows = [header]
        names = sorted(set(self.domains) | set(stats.domains))
        for name in names + ["total"]:
            d = stats.total() if name == "total" else stats.domains.get(name)
            toks = [sum(c.values()) if name == "total" else c.get(name, 0) for c in counts.values()]
            rows.append((name, f"{d.documents:,}" if d else "-", f"{d.bytes / 1e6:.1f}" if d else "-",
                         f"{d.duplicates:,}" if d else "-", f"{d.undecodable + d.unreadable:,}" if d else "-")
                        + tuple(f"{t:,}" for t in toks))
        text = format_table(rows)
        if stats.missing:
            text += "\nnot installed: " + ", ".join(stats.missing)
        return text


def build_token_cache(
    cache_dir: PathLike,
    documents: Iterable[Document],
    tokenizer: Tokenizer,
    progress: bool = True,
    *,
    fingerprint: str = "",
    corpus_stats: Optional[CorpusStats] = None,
    total_bytes: Optional[int] = None,
    validation_fraction: float = VALIDATION_FRACTION,
    test_fraction: float = TEST_FRACTION,
    manifest: Optional[dict] = None,
) -> TokenCache:
    """Tokenize ``documents`` into ``cache_dir`` (each to its ``split_of`` split) and open it.

    Every file is written under a temporary name and renamed at the end, ``meta.json`` last, and an
    existing ``meta.json`` is removed first: an interrupted build leaves no valid-looking cache.
    ``fingerprint`` is stored for the caller's reuse check; ``corpus_stats`` (filled by the same
    ``iter_documents`` that produces ``documents``) is stored after the iteration ends;
    ``total_bytes`` sizes the progress bar; the fractions go to ``split_of``; ``manifest`` (what
    each source was, ``corpus.source_manifest``) is stored with the corpus stats.
    """
    check_fractions(validation_fraction, test_fraction)
    path = Path(cache_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / META).unlink(missing_ok=True)
    eos = eos_id(tokenizer)
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    suffix = f".tmp{os.getpid()}"
    tmp_files: list[Path] = []

    def tmp(name: str) -> Path:
        p = path / (name + suffix)
        tmp_files.append(p)
        return p

    domains: list[str] = []
    domain_index: dict[str, int] = {}
    n_tokens = {s: 0 for s in SPLITS}
    doc_bounds: dict[str, list[tuple[int, int]]] = {s: [] for s in SPLITS}
    doc_domains: dict[str, list[int]] = {s: [] for s in SPLITS}
    per_domain: dict[str, dict[str, dict[str, int]]] = {s: {} for s in SPLITS}
    corpus_hash = hashlib.sha256()
    # A document that contains the literal text "<|endoftext|>" (tokenizer code does) must not
    # turn into a real EOS: special tokens are encoded as plain text while building.
    saved_flag = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    outs = {s: open(tmp(f"{s}.bin"), "wb") for s in SPLITS}
    try:
        def flush(batch: list[tuple[Document, bytes, int]]) -> None:
            encs = tokenizer.encode_batch_fast([d.text for d, _, _ in batch], add_special_tokens=False)
            grouped: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
            for (doc, h, n_bytes), enc in zip(batch, encs):
                split = split_of_hash(h, validation_fraction, test_fraction)
                ids = np.empty(len(enc.ids) + 1, dtype=dtype)
                ids[:-1] = enc.ids
                ids[-1] = eos
                grouped[split].append(ids)
                start = n_tokens[split]
                n_tokens[split] += len(ids)
                doc_bounds[split].append((start, start + len(ids) - 1))
                if doc.domain not in domain_index:
                    domain_index[doc.domain] = len(domains)
                    domains.append(doc.domain)
                doc_domains[split].append(domain_index[doc.domain])
                c = per_domain[split].setdefault(doc.domain, {"documents": 0, "tokens": 0, "bytes": 0})
                c["documents"] += 1
                c["tokens"] += len(ids)
                c["bytes"] += n_bytes
            for s, arrays in grouped.items():
                if arrays:
                    outs[s].write(np.concatenate(arrays).tobytes())
            bar.update(sum(n for _, _, n in batch))

        batch: list[tuple[Document, bytes, int]] = []
        chars = 0
        for doc in documents:
            h = content_hash(doc.text)
            corpus_hash.update(h)
            batch.append((doc, h, len(doc.text.encode("utf-8"))))
            chars += len(doc.text)
            if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
                flush(batch)
                batch, chars = [], 0
        if batch:
            flush(batch)
        for f in outs.values():
            f.close()
        if len(domains) > np.iinfo(np.uint16).max:
            raise CacheError(f"too many domains ({len(domains)})")
        for s in SPLITS:
            with open(tmp(f"{s}.docs.npy"), "wb") as f:
                np.save(f, np.asarray(doc_bounds[s], dtype=np.int64).reshape(-1, 2))
            with open(tmp(f"{s}.domains.npy"), "wb") as f:
                np.save(f, np.asarray(doc_domains[s], dtype=np.uint16))
        meta = {
            "format": CACHE_FORMAT,
            "fingerprint": fingerprint,
            "tokenizer_sha256": tokenizer_sha256(tokenizer),
            "corpus_sha256": corpus_hash.hexdigest(),
            "vocab_size": vocab_size,
            "eos_id": eos,
            "dtype": dtype.name,
            "domains": domains,
            "split_fractions": {"validation": validation_fraction, "test": test_fraction},
            "splits": {s: {"tokens": n_tokens[s], "documents": len(doc_bounds[s]), "domains": per_domain[s]}
                       for s in SPLITS},
            "corpus": corpus_stats.to_dict() if corpus_stats is not None else None,
            "manifest": manifest,
        }
        with open(tmp(META), "w") as f:
            json.dump(meta, f, indent=1)
        # Data files first, meta.json last: the cache becomes valid in one atomic rename.
        for p in tmp_files:
            if p.name != META + suffix:
                os.replace(p, path / p.name[: -len(suffix)])
        os.replace(path / (META + suffix), path / META)
    finally:
        tokenizer.encode_special_tokens = saved_flag
        bar.close()
        for f in outs.values():
            f.close()
        for p in tmp_files:
            p.unlink(missing_ok=True)
    return TokenCache.open(path)
