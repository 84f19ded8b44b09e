"""Held-out evaluation of a checkpoint: loss, perplexity and bits per byte, overall and per domain.

    from deepseek_moe.evaluate import eval_cache, evaluate_splits
    from deepseek_moe.runs import load_checkpoint
    model, tokenizer, ckpt, run = load_checkpoint("runs/main")
    cache = eval_cache(ckpt, run)
    report = evaluate_splits(model, cache)

The checkpoint is found and loaded by ``deepseek_moe.runs``. The held-out data is the run's corpus
(the settings in its ``train_config.json``) tokenized with the checkpoint's own ``tokenizer.json``.

Bits per byte use the UTF-8 byte count of each domain's held-out documents:
``bpb = loss / ln 2 * tokens / bytes`` (tokens include the end-of-text token after each
document), the tokenizer-independent measure for comparing models with different vocabularies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import CheckpointError
from .model import DeepseekForCausalLM
from .runs import TOKENIZER_NAME, PathLike, run_train_config
from .tables import format_table


def eval_cache(ckpt: Path, run_dir: Optional[Path], tokenizer_path: Optional[PathLike] = None, *,
               data_dir: Optional[PathLike] = None, sources: Optional[Sequence[str]] = None,
               paths: Optional[Sequence[PathLike]] = None, progress: bool = True):
    """The token cache of the run's corpus (or the one given), tokenized with the checkpoint's
    tokenizer; built if needed, reused when it already matches.

    On the run's own corpus (no ``sources`` / ``paths`` given), the cache must hold the corpus the
    checkpoint recorded: a changed one is refused, naming what changed. Other corpora get caches
    of their own (``prepare``), so the run's is never rewritten.
    """
    from .data import check_corpus, default_data_dir, prepare_data
    from .train_state import read_trainer_state

    settings = run_train_config(run_dir)  # None: a checkpoint outside any run
    tok_path = Path(tokenizer_path) if tokenizer_path else ckpt / TOKENIZER_NAME
    if not tok_path.is_file():
        if settings is not None and settings.tokenizer:
            tok_path = Path(settings.tokenizer)
        else:
            raise CheckpointError(f"{ckpt} has no {TOKENIZER_NAME}: pass the tokenizer the model "
                                  "was trained with (--tokenizer)")
    own = sources is None and paths is None
    if own and settings is not None and not settings.sources and not settings.paths:
        raise CheckpointError(f"{run_dir} records no text corpus (a fine-tuning run): evaluate it on "
                              "--text FILE, or on --sources with --data-dir of the corpus you want")
    data_dir = data_dir or (settings.data_path if settings is not None else default_data_dir())
    kwargs: dict[str, Any] = {}
    if settings is not None:
        kwargs = {"validation_fraction": settings.validation_fraction, "test_fraction": settings.test_fraction}
    if sources is None:
        sources = settings.sources if settings is not None else ()
    if paths is None:
        paths = settings.paths if settings is not None else ()
    _, cache = prepare_data(data_dir, sources=tuple(sources), paths=tuple(paths),
                            tokenizer_path=tok_path, progress=progress, **kwargs)
    if own and (ckpt / "trainer_state.json").is_file():
        recorded = read_trainer_state(ckpt).get("corpus")
        check_corpus(recorded, cache, f"evaluating {ckpt} on its run's corpus")
    return cache


def check_text_files(paths: Sequence[PathLike]) -> None:
    """Refuse a ``--text`` file that is empty, not UTF-8 or binary, naming it (evaluating other
    text must score exactly what was given, not silently less)."""
    from .data.corpus import user_files

    for _, f in user_files(paths):
        data = f.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{f} is not UTF-8 text (byte {e.start}): nothing of it can be evaluated") from None
        if "\x00" in text:
            raise ValueError(f"{f} holds NUL bytes: a binary file, not text")
        if not text.strip():
            raise ValueError(f"{f} is empty: nothing to evaluate")


TEXT_SPLIT = "train"  # a --text cache holds every document in one split, stored as "train"


def text_cache(paths: Sequence[PathLike], tokenizer_path: PathLike, progress: bool = True):
    """Exactly the given files (no built-in source, no held-out sampling: every document in the
    split ``TEXT_SPLIT``), tokenized into a temporary folder removed when the process exits."""
    import atexit
    import shutil
    import tempfile

    from .data import CorpusStats, build_token_cache, iter_documents, load_tokenizer

    check_text_files(paths)
    tok = load_tokenizer(tokenizer_path)
    work = Path(tempfile.mkdtemp(prefix="deepseek-moe-text-"))
    atexit.register(shutil.rmtree, work, True)
    stats = CorpusStats()
    docs = iter_documents((), tuple(paths), stats=stats)
    return build_token_cache(work / "cache", docs, tok, progress, corpus_stats=stats,
                             validation_fraction=0.0, test_fraction=0.0)


# --- loss over a token stream -------------------------------------------------------------------------
@dataclass
class EvalStats:
    """Sums over the evaluated windows; ``loss`` and friends are the derived means."""

    nll: float = 0.0  # summed next-token negative log-likelihood (nats)
    predicted: int = 0  # tokens whose likelihood was scored
    fed: int = 0  # tokens fed to the model (routing counts are over these)
    tokens_per_expert: Optional[torch.Tensor] = None  # [L_moe, E] int64 assignments
    entropy_sum: Optional[torch.Tensor] = None  # [L_moe] routing entropy x tokens fed

    @property
    def loss(self) -> float:
        return self.nll / self.predicted if self.predicted else float("nan")

    @property
    def routing_entropy(self) -> Optional[torch.Tensor]:
        return None if self.entropy_sum is None else self.entropy_sum / max(self.fed, 1)

    def add(self, other: "EvalStats") -> "EvalStats":
        self.nll += other.nll
        self.predicted += other.predicted
        self.fed += other.fed
        for name in ("tokens_per_expert", "entropy_sum"):
            a, b = getattr(self, name), getattr(other, name)
            setattr(self, name, b.clone() if a is None else a if b is None else a + b)
        return self


def windows(tokens: np.ndarray, seq_len: int, max_tokens: Optional[int] = None) -> list[tuple[int, int]]:
    """``(start, end)`` of non-overlapping windows covering the stream (the last may be shorter,
    down to 2 tokens); with ``max_tokens``, about that many tokens' worth of windows spread evenly
    over the stream (held-out splits are stored document by document)."""
    n = len(tokens)
    spans = [(s, min(s + seq_len, n)) for s in range(0, n, seq_len)]
    spans = [(s, e) for s, e in spans if e - s >= 2]
    if max_tokens is not None and len(spans) * seq_len > max_tokens:
        k = max(1, max_tokens // seq_len)
        spans = [spans[i * len(spans) // k] for i in range(k)]
    return spans


@torch.no_grad()
def evaluate_tokens(model: DeepseekForCausalLM, tokens: np.ndarray, seq_len: int = 256,
                    batch_size: int = 16, max_tokens: Optional[int] = None,
                    bar: Optional[tqdm] = None) -> EvalStats:
    """Next-token NLL over ``tokens`` in windows of ``seq_len`` (each window starts fresh), plus
    the routing counts and entropy of every MoE layer. Advances ``bar`` by windows."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    device = model.model.embed_tokens.weight.device
    spans = windows(tokens, seq_len, max_tokens)
    stats = EvalStats()
    # Full windows batch together; the one short tail goes alone.
    groups: dict[int, list[tuple[int, int]]] = {}
    for s, e in spans:
        groups.setdefault(e - s, []).append((s, e))
    for length, group in groups.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            x = torch.from_numpy(np.stack([np.asarray(tokens[s:e], dtype=np.int64) for s, e in chunk]))
            x = x.to(device)
            out = model(x)
            nll = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.size(-1)).float(),
                                  x[:, 1:].reshape(-1), reduction="sum")
            if not torch.isfinite(nll):
                raise FloatingPointError("the model produced a non-finite loss on held-out data "
                                         "(NaN or inf weights?)")
            fed = x.numel()
            stats.add(EvalStats(float(nll), x.shape[0] * (length - 1), fed,
                                out.tokens_per_expert.detach().cpu(),
                                (out.routing_entropy.detach().float() * fed).cpu()))
            if bar is not None:
                bar.update(len(chunk))
    return stats


# --- per split and per domain -------------------------------------------------------------------------
@dataclass
class Score:
    loss: float
    tokens: int  # tokens in the held-out text (EOS included)
    bytes: int  # UTF-8 bytes of the held-out text
    evaluated: int  # tokens scored (fewer with --max-tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")

    @property
    def bits_per_byte(self) -> float:
        return self.loss / math.log(2) * self.tokens / self.bytes if self.bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes, "evaluated_tokens": self.evaluated}


@dataclass
class EvalReport:
    checkpoint: str
    seq_len: int
    splits: dict[str, dict[str, Score]] = field(default_factory=dict)  # split -> domain|"all" -> score

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "seq_len": self.seq_len,
                "splits": {s: {d: sc.to_dict() for d, sc in v.items()} for s, v in self.splits.items()}}

    def format(self) -> str:
        out = []
        for split, scores in self.splits.items():
            rows = [(split, "loss", "ppl", "bits/byte", "tokens", "scored")]
            for d, sc in scores.items():
                rows.append((d, f"{sc.loss:.4f}", f"{sc.perplexity:.2f}", f"{sc.bits_per_byte:.4f}",
                             f"{sc.tokens:,}", f"{sc.evaluated:,}"))
            out.append(format_table(rows))
        return "\n\n".join(out)


def evaluate_splits(model: DeepseekForCausalLM, cache, splits: Sequence[str] = ("validation", "test"),
                    seq_len: int = 256, batch_size: int = 16, max_tokens: Optional[int] = None,
                    progress: bool = True, checkpoint: str = "") -> EvalReport:
    """Loss, perplexity and bits per byte of each split, per domain and over all (``"all"``: the
    token-weighted mean). ``max_tokens`` caps the tokens scored per domain and split."""
    report = EvalReport(checkpoint=checkpoint, seq_len=seq_len)
    plan = []
    for split in splits:
        if split not in cache.splits:
            raise ValueError(f"unknown split {split!r}; the cache has {', '.join(cache.splits)}")
        meta = cache.meta["splits"][split]["domains"]
        for d in cache.domains:
            if meta.get(d, {}).get("tokens", 0) >= 2:
                toks = cache.domain_tokens(split, d)
                plan.append((split, d, toks, len(windows(toks, seq_len, max_tokens))))
    if not plan:
        raise ValueError(f"the held-out splits {', '.join(splits)} are empty: nothing to evaluate "
                         "(raise validation_fraction / test_fraction for a small corpus)")
    bar = tqdm(total=sum(p[3] for p in plan), unit="seq", desc="evaluating", disable=not progress)
    try:
        totals: dict[str, list[float]] = {}
        for split, d, toks, _ in plan:
            st = evaluate_tokens(model, toks, seq_len, batch_size, max_tokens, bar)
            m = cache.meta["splits"][split]["domains"][d]
            report.splits.setdefault(split, {})[d] = Score(st.loss, m["tokens"], m["bytes"], st.predicted)
            t = totals.setdefault(split, [0.0, 0, 0, 0])
            # "all" weights each domain by its share of the split, whatever max_tokens sampled.
            t[0] += st.loss * m["tokens"]
            t[1] += m["tokens"]
            t[2] += m["bytes"]
            t[3] += st.predicted
        for split, (wsum, tokens, nbytes, scored) in totals.items():
            report.splits[split]["all"] = Score(wsum / tokens, int(tokens), int(nbytes), int(scored))
    finally:
        bar.close()
    return report
