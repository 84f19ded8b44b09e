"""Data pipeline: local multi-domain corpus -> byte-level BPE -> memory-mapped token cache -> packed,
resumably shuffled training sequences. ``prepare_data`` does the first three in one call."""

from .cache import CacheError, TokenCache, build_token_cache
from .corpus import (
    DEFAULT_SOURCES,
    SPLITS,
    TEST_FRACTION,
    VALIDATION_FRACTION,
    CorpusError,
    default_data_dir,
    CorpusStats,
    Document,
    DomainStats,
    iter_documents,
    split_of,
)
from .packing import PackedSequences, SequenceSampler, batch
from .prepare import check_corpus, corpus_record, prepare_data
from .tokenizer import EOS_TOKEN, TokenizerError, eos_id, load_tokenizer, save_tokenizer, train_tokenizer

__all__ = [
    "CacheError",
    "CorpusError",
    "CorpusStats",
    "DEFAULT_SOURCES",
    "Document",
    "DomainStats",
    "EOS_TOKEN",
    "PackedSequences",
    "SPLITS",
    "SequenceSampler",
    "TEST_FRACTION",
    "TokenCache",
    "TokenizerError",
    "VALIDATION_FRACTION",
    "batch",
    "build_token_cache",
    "check_corpus",
    "corpus_record",
    "default_data_dir",
    "eos_id",
    "iter_documents",
    "load_tokenizer",
    "prepare_data",
    "save_tokenizer",
    "split_of",
    "train_tokenizer",
]
