"""Multiple-choice evaluation by log-likelihood, as lm-eval-harness scores it.

Each choice is scored by the summed log-probability of its tokens after the context. ``acc`` picks
the highest sum; ``acc_norm`` divides each sum by the choice's length in characters first.

Files in the published formats load with ``load_task_file`` (format detected from the fields):

* HellaSwag: ``{"ctx_a", "ctx_b", "activity_label", "endings": [4], "label"}``
* PIQA: ``{"goal", "sol1", "sol2", "label"}`` (or the labels in a sibling ``NAME-labels.lst``)
* ARC-Easy / ARC-Challenge: ``{"question": {"stem", "choices": [{"text", "label"}]},
  "answerKey"}`` (AI2's release) or ``{"question": str, "choices": {"text": [], "label": []},
  "answerKey"}`` (the HF dataset)
* generic: ``{"context", "choices": [...], "label": int}``

``builtin_task`` makes an offline task from the held-out split of a token cache: the true
continuation of a passage among distractors cut from other documents of the same domain.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .model import DeepseekForCausalLM

Tokens = list[int]


@dataclass
class MCExample:
    """One question: a context and its choices (text, or token ids for the built-in task)."""

    context: Union[str, Tokens]
    choices: list[Union[str, Tokens]]
    label: int
    group: str = ""  # a domain or subtask, for per-group accuracy
    delimiter: str = " "  # put between context and a text choice (lm-eval's target_delimiter)


# --- scoring ------------------------------------------------------------------------------------------
@torch.no_grad()
def score_continuations(model: DeepseekForCausalLM, pairs: Sequence[tuple[Tokens, Tokens]],
                        batch_size: int = 16, max_len: Optional[int] = None,
                        progress: bool = False, desc: str = "scoring") -> list[tuple[float, bool]]:
    """``(sum of log p(continuation | context), whether greedy decoding gives it)`` per pair.

    The model sees ``(context + continuation)[:-1]``, cut from the left to ``max_len`` tokens
    (default the model's context length). Pairs are batched longest first, padded on the right.
    """
    cfg = model.config
    max_len = max_len or cfg.max_position_embeddings
    device = model.model.embed_tokens.weight.device
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise ValueError(f"pair {i}: the continuation is empty")
        if not ctx:
            raise ValueError(f"pair {i}: the context is empty (start it with the end-of-text token)")
        if len(cont) > max_len:
            raise ValueError(f"pair {i}: continuation of {len(cont)} tokens exceeds {max_len}")
        whole = list(ctx) + list(cont)
        inp = whole[:-1][-max_len:]
        rows.append((i, inp, list(cont)))
    for _, inp, _ in rows:
        bad = [t for t in inp if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for vocab_size {cfg.vocab_size}")
    rows.sort(key=lambda r: -len(r[1]))
    out: list[Optional[tuple[float, bool]]] = [None] * len(rows)
    for b in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress, unit="batch"):
        chunk = rows[b:b + batch_size]
        L = len(chunk[0][1])
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        for j, (_, inp, _) in enumerate(chunk):
            x[j, : len(inp)] = torch.tensor(inp)
        logp = F.log_softmax(model(x.to(device)).logits.float(), dim=-1)
        for j, (i, inp, cont) in enumerate(chunk):
            n = len(cont)
            lp = logp[j, len(inp) - n: len(inp)]  # the positions that predict the continuation
            target = torch.tensor(cont, device=lp.device)
            total = float(lp.gather(-1, target[:, None]).sum())
            greedy = bool((lp.argmax(-1) == target).all())
            out[i] = (total, greedy)
    return out  # type: ignore[return-value]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[Tokens, Tokens]:
    """Token ids of context and continuation as lm-eval splits them: trailing spaces of the
    context move to the continuation, and the continuation is what encoding the whole adds."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tokenizer.encode(context, add_special_tokens=False).ids
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    if whole[: len(ctx)] != ctx:  # a merge across the boundary: fall back to separate encoding
        return ctx, tokenizer.encode(continuation, add_special_tokens=False).ids
    return ctx, whole[len(ctx):]


@dataclass
class MCResult:
    task: str
    n: int
    acc: float
    acc_norm: float
    groups: dict[str, dict[str, float]] = field(default_factory=dict)  # group -> {n, acc, acc_norm}
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        d = {"task": self.task, "n": self.n, "acc": self.acc, "acc_norm": self.acc_norm,
             "groups": self.groups}
        if with_predictions:
            d["predictions"] = self.predictions
        return d


def evaluate_multiple_choice(model: DeepseekForCausalLM, examples: Sequence[MCExample], tokenizer=None,
                             task: str = "task", batch_size: int = 16, progress: bool = True,
                             eos_id: Optional[int] = None) -> MCResult:
    """Accuracy and length-normalised accuracy over ``examples`` (``tokenizer`` for text ones).

    A text context that is empty is conditioned on ``eos_id`` (the end-of-text token), as lm-eval
    does with its prefix token.
    """
    if not examples:
        raise ValueError(f"task {task!r} has no examples")
    pairs: list[tuple[Tokens, Tokens]] = []
    lengths: list[list[int]] = []
    index: list[tuple[int, int]] = []
    for qi, ex in enumerate(examples):
        if not 0 <= ex.label < len(ex.choices):
            raise ValueError(f"{task} example {qi}: label {ex.label} is not one of its "
                             f"{len(ex.choices)} choices")
        lens = []
        for ci, ch in enumerate(ex.choices):
            if isinstance(ex.context, str):
                if tokenizer is None:
                    raise ValueError("text examples need a tokenizer")
                if not isinstance(ch, str):
                    raise ValueError(f"{task} example {qi}: mixed text and token choices")
                if ex.context:
                    ctx, cont = encode_pair(tokenizer, ex.context, ex.delimiter + ch)
                else:
                    if eos_id is None:
                        raise ValueError(f"{task} example {qi}: empty context and no eos_id")
                    ctx, cont = [eos_id], tokenizer.encode(ch, add_special_tokens=False).ids
                if not cont:
                    raise ValueError(f"{task} example {qi}, choice {ci}: encodes to no tokens")
                lens.append(len(ch))
            else:
                ctx, cont = list(ex.context), list(ch)  # type: ignore[arg-type]
                text = tokenizer.decode(cont) if tokenizer is not None else None
                lens.append(len(text) if text else len(cont))
            pairs.append((ctx, cont))
            index.append((qi, ci))
        lengths.append(lens)
    scores = score_continuations(model, pairs, batch_size, progress=progress, desc=task)
    per_q: list[list[float]] = [[0.0] * len(ex.choices) for ex in examples]
    for (qi, ci), (lp, _) in zip(index, scores):
        per_q[qi][ci] = lp
    correct = correct_norm = 0
    groups: dict[str, list[int]] = {}
    preds = []
    for qi, ex in enumerate(examples):
        lp = np.array(per_q[qi])
        norm = lp / np.maximum(np.array(lengths[qi], dtype=float), 1.0)
        a, an = int(lp.argmax() == ex.label), int(norm.argmax() == ex.label)
        correct += a
        correct_norm += an
        g = groups.setdefault(ex.group, [0, 0, 0])
        g[0] += 1
        g[1] += a
        g[2] += an
        preds.append({"label": ex.label, "pred": int(lp.argmax()), "pred_norm": int(norm.argmax()),
                      "logprobs": lp.tolist()})
    n = len(examples)
    return MCResult(task, n, correct / n, correct_norm / n,
                    {k: {"n": v[0], "acc": v[1] / v[0], "acc_norm": v[2] / v[0]}
                     for k, v in sorted(groups.items()) if k},
                    preds)


# --- published formats --------------------------------------------------------------------------------
def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _from_hellaswag(r: dict[str, Any]) -> MCExample:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize() if "ctx_a" in r else r["ctx"]
    query = _hellaswag_clean(f"{r['activity_label']}: {ctx}" if r.get("activity_label") else ctx)
    return MCExample(query, [_hellaswag_clean(e) for e in r["endings"]], int(r["label"]),
                     str(r.get("activity_label", "")))


def _from_piqa(r: dict[str, Any]) -> MCExample:
    return MCExample(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))


def _from_arc(r: dict[str, Any]) -> MCExample:
    q = r["question"]
    if isinstance(q, dict):  # AI2's release
        stem, texts, labels = q["stem"], [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]]
    else:  # the HF dataset
        stem, texts, labels = q, list(r["choices"]["text"]), list(r["choices"]["label"])
    key = str(r["answerKey"])
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not among the choice labels {labels}")
    return MCExample(f"Question: {stem}\nAnswer:", texts, labels.index(key))


def _from_generic(r: dict[str, Any]) -> MCExample:
    ctx = r.get("context", r.get("query", ""))
    return MCExample(ctx, list(r["choices"]), int(r.get("label", r.get("gold"))))


FORMATS = {
    "hellaswag": (("endings",), _from_hellaswag),
    "piqa": (("goal", "sol1", "sol2"), _from_piqa),
    "arc": (("question", "answerKey"), _from_arc),
    "generic": (("choices",), _from_generic),
}


def detect_format(record: dict[str, Any]) -> str:
    for name, (fields, _) in FORMATS.items():
        if all(f in record for f in fields):
            return name
    raise ValueError(f"unrecognised multiple-choice record with fields {sorted(record)}; expected "
                     "HellaSwag (endings, label), PIQA (goal, sol1, sol2), ARC (question, answerKey) "
                     "or generic (context, choices, label)")


def load_task_file(path: Union[str, Path], fmt: Optional[str] = None,
                   limit: Optional[int] = None) -> tuple[str, list[MCExample]]:
    """``(format, examples)`` from a JSONL file (one record per line) in a published format."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such task file")
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise ValueError(f"{path}: no records")
    fmt = fmt or detect_format(records[0])
    if fmt == "piqa" and "label" not in records[0]:
        lst = path.with_name(path.stem + "-labels.lst")
        if not lst.is_file():
            raise ValueError(f"{path}: PIQA records carry no label and {lst.name} is missing")
        labels = [ln.strip() for ln in lst.read_text().splitlines() if ln.strip()]
        if len(labels) < len(records):
            raise ValueError(f"{lst}: {len(labels)} labels for {len(records)} records")
        for r, lab in zip(records, labels):
            r["label"] = int(lab)
    convert = FORMATS[fmt][1]
    out = []
    for n, r in enumerate(records, 1):
        try:
            out.append(convert(r))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: record {n} is not valid {fmt}: {type(e).__name__}: {e}") from None
    return fmt, out


# --- the built-in offline task ------------------------------------------------------------------------
def builtin_task(cache, split: str = "validation", per_domain: int = 100, context_tokens: int = 64,
                 continuation_tokens: int = 16, n_choices: int = 4, seed: int = 0) -> list[MCExample]:
    """Pick the true continuation of a held-out passage among ``n_choices``.

    For each domain, ``per_domain`` passages are drawn uniformly over the positions of the
    documents long enough to hold one (a long document gives several); the context is
    ``context_tokens`` tokens, the answer the next ``continuation_tokens``, and the distractors are
    spans of that length from other documents of the same domain. Domains with fewer than
    ``n_choices`` such documents are skipped. Deterministic for a given cache and seed.
    """
    need = context_tokens + continuation_tokens
    docs = np.asarray(cache.documents(split))
    doms = np.asarray(cache.document_domains(split))
    toks = cache.tokens(split)
    rng = np.random.default_rng(seed)
    out: list[MCExample] = []

    def span(d: int, n: int) -> tuple[int, int]:
        s, e = docs[d]
        p = s + int(rng.integers(0, e - s - n + 1))
        return p, p + n

    def ids(a: int, b: int) -> Tokens:
        return np.asarray(toks[a:b], dtype=np.int64).tolist()

    for di, name in enumerate(cache.domains):
        idx = np.flatnonzero((doms == di) & (docs[:, 1] - docs[:, 0] >= need))
        if len(idx) < n_choices:
            continue
        starts = (docs[idx, 1] - docs[idx, 0] - need + 1).astype(float)
        for d in rng.choice(idx, size=per_domain, p=starts / starts.sum()):
            a, _ = span(d, need)
            choices = [ids(*span(o, continuation_tokens))
                       for o in rng.choice(idx[idx != d], size=n_choices - 1, replace=False)]
            label = int(rng.integers(0, n_choices))
            choices.insert(label, ids(a + context_tokens, a + need))
            out.append(MCExample(ids(a, a + context_tokens), choices, label, name))
    if not out:
        raise ValueError(f"the {split} split has no domain with {n_choices} documents of at least "
                         f"{need} tokens: no built-in task can be made")
    return out
