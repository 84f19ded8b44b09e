"""Supervised fine-tuning data: JSONL examples -> token ids with a loss mask -> packed or padded rows.

One example per line, in either form:

- a conversation: ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``,
  rendered with the chat template (the checkpoint's, as ``chat`` uses it); the loss counts the
  tokens of every assistant turn (its text and the template's end-of-turn token), nothing else;
- a prompt/completion pair: ``{"prompt": "...", "completion": "..."}``, encoded as bos (when the
  template has one), the prompt, the completion and eos; the loss counts the completion and eos.

An assistant turn's tokens are found by rendering the conversation turn by turn: the text a turn
adds to the rendering is encoded on its own, so the boundary between what the model reads and what
it learns to write is exact (the texts are encoded piecewise, at the boundaries of the template's
own segments). A template that does not render a conversation as the concatenation of its turns
cannot be split so and is refused.

Rows: ``pack`` puts whole examples into rows of ``seq_len`` tokens, as densely as possible
(best-fit decreasing, deterministic), and ``segment_ids`` keep them apart: a token attends only to
its own example, whose positions start at 0 (``model.segment_mask_and_positions``). Without
packing, each row holds one example. Rows are padded at the end; padding carries no loss, and a
batch is cut to its longest row.

Bad examples (unparseable, wrong schema, no assistant turn or completion, longer than
``seq_len``) are reported by line number: all of them, in one error, unless ``skip_bad``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from ..chat import ChatTemplate

IGNORE = -100  # the label of a token that carries no loss
PAD_SEGMENT = -1
ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "chat", "prompt")


class SFTDataError(ValueError):
    """A fine-tuning data file that cannot be used, with the line numbers of its bad examples."""


@dataclass
class Example:
    line: int  # 1-based line of the data file
    ids: list[int]
    targets: list[bool]  # token i carries loss (it is predicted from the tokens before it)
    text_hash: bytes  # content hash of the line, for the validation split

    def __len__(self) -> int:
        return len(self.ids)


class BadExample(ValueError):
    pass


def _messages(obj: dict[str, Any]) -> list[dict[str, str]]:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise BadExample('"messages" must be a non-empty list')
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadExample(f'message {i} must be an object with "role" and "content" strings')
        if m["role"] not in ROLES:
            raise BadExample(f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadExample("no assistant turn: nothing to learn")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _encode(tokenizer: "Tokenizer", text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids if text else []


def encode_chat(messages: list[dict[str, str]], tokenizer: "Tokenizer", template: "ChatTemplate") -> tuple[list[int], list[bool]]:
    """Token ids of a conversation rendered with ``template`` and which of them carry loss (every
    assistant turn's tokens)."""
    ids: list[int] = []
    targets: list[bool] = []
    done = ""  # the text rendered so far
    for i, m in enumerate(messages):
        if m["role"] == "assistant":  # the prompt of this turn is the model's to read
            opening = template.render(messages[:i], add_generation_prompt=True)
            if not opening.startswith(done):
                raise BadExample("the chat template does not render this conversation turn by turn")
            piece = _encode(tokenizer, opening[len(done):])
            ids += piece
            targets += [False] * len(piece)
            done = opening
        text = template.render(messages[: i + 1])
        if not text.startswith(done):
            raise BadExample("the chat template does not render this conversation turn by turn")
        piece = _encode(tokenizer, text[len(done):])
        ids += piece
        targets += [m["role"] == "assistant"] * len(piece)
        done = text
    return ids, targets


def encode_prompt_completion(prompt: str, completion: str, tokenizer: "Tokenizer",
                             template: "ChatTemplate") -> tuple[list[int], list[bool]]:
    bos = _encode(tokenizer, template.bos_token or "")
    eos = _encode(tokenizer, template.eos_token or "")
    p, c = _encode(tokenizer, prompt), _encode(tokenizer, completion) + eos
    return bos + p + c, [False] * (len(bos) + len(p)) + [True] * len(c)


def _example(raw: bytes, line: int, fmt: str, tokenizer: "Tokenizer", template: "ChatTemplate",
             seq_len: int) -> Example:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadExample(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadExample(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise BadExample("not a JSON object")
    kind = fmt if fmt != "auto" else ("chat" if "messages" in obj else "prompt")
    if kind == "chat":
        if "messages" not in obj:
            raise BadExample('no "messages" (the chat format)')
        ids, targets = encode_chat(_messages(obj), tokenizer, template)
    else:
        if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("completion"), str):
            raise BadExample('needs "messages", or "prompt" and "completion" strings')
        if not obj["completion"]:
            raise BadExample("empty completion: nothing to learn")
        ids, targets = encode_prompt_completion(obj["prompt"], obj["completion"], tokenizer, template)
    if len(ids) > seq_len:
        raise BadExample(f"{len(ids)} tokens, longer than seq_len {seq_len}")
    if not any(targets[1:]):
        raise BadExample("no token to learn after the first")
    targets[0] = False  # the first token of a row's example is never predicted from it
    return Example(line, ids, targets, hashlib.sha256(raw).digest())


def read_examples(path: "str | Path", tokenizer: "Tokenizer", template: "ChatTemplate", seq_len: int,
                  fmt: str = "auto", skip_bad: bool = False, say=print) -> list[Example]:
    """The examples of a JSONL file (blank lines skipped). Bad examples raise ``SFTDataError``
    listing each by line number, or with ``skip_bad`` are reported and left out."""
    if fmt not in FORMATS:
        raise SFTDataError(f"unknown data format {fmt!r}; choose from {', '.join(FORMATS)}")
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SFTDataError(f"{path}: cannot read ({e.strerror or e})") from None
    examples, bad = [], []
    vocab = tokenizer.get_vocab_size()
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            ex = _example(raw, n, fmt, tokenizer, template, seq_len)
            if max(ex.ids) >= vocab:
                raise BadExample(f"token id {max(ex.ids)} out of the vocabulary of {vocab}")
            examples.append(ex)
        except BadExample as e:
            bad.append(f"line {n}: {e}")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; ... {len(bad) - 5} more" if len(bad) > 5 else "")
        if not skip_bad:
            raise SFTDataError(f"{path}: {len(bad)} bad example(s): {shown} (--skip-bad leaves them out)")
        say(f"{path}: skipping {len(bad)} bad example(s): {shown}")
    if not examples:
        raise SFTDataError(f"{path}: no usable example")
    return examples


def split_examples(examples: Sequence[Example], validation_fraction: float) -> tuple[list[Example], list[Example]]:
    """(training, validation) examples, each assigned by its line's content hash (stable when the
    file is reordered or grows). With a fraction of 0, or nothing assigned to validation, the
    validation examples are the training examples."""
    if validation_fraction <= 0:
        return list(examples), list(examples)
    from .corpus import split_of_hash

    val = [e for e in examples if split_of_hash(e.text_hash, validation_fraction, 0.0) == "validation"]
    train = [e for e in examples if split_of_hash(e.text_hash, validation_fraction, 0.0) != "validation"]
    if not train:
        raise SFTDataError(f"validation_fraction {validation_fraction} leaves no training example")
    return train, (val or train)


def pack(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Example indices per row: best-fit decreasing (longest first, each into the row it fills
    most closely, else a new row); ties broken by index, so the result is deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than seq_len {seq_len}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


class SFTRows:
    """Rows of whole examples: ``__getitem__`` gives ``input_ids``, ``labels`` (``IGNORE`` where
    no loss) and ``segment_ids`` (the example's index in the row; ``PAD_SEGMENT`` for padding),
    each a LongTensor [seq_len]."""

    def __init__(self, examples: Sequence[Example], seq_len: int, packing: bool, pad_id: int) -> None:
        self.seq_len = seq_len
        self.examples = list(examples)
        self.rows = pack([len(e) for e in self.examples], seq_len) if packing else [[i] for i in range(len(self.examples))]
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def target_tokens(self) -> int:
        return sum(sum(e.targets) for e in self.examples)

    @property
    def fill(self) -> float:
        """Share of the rows' slots that hold example tokens."""
        return sum(len(e) for e in self.examples) / max(1, len(self.rows) * self.seq_len)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels, seg = [], [], []
        for s, k in enumerate(self.rows[i]):
            e = self.examples[k]
            ids += e.ids
            labels += [t if on else IGNORE for t, on in zip(e.ids, e.targets)]
            seg += [s] * len(e)
        pad = self.seq_len - len(ids)
        return {"input_ids": torch.tensor(ids + [self.pad_id] * pad),
                "labels": torch.tensor(labels + [IGNORE] * pad),
                "segment_ids": torch.tensor(seg + [PAD_SEGMENT] * pad)}

    def targets(self, i: int) -> int:
        """Target tokens of row ``i``."""
        return sum(sum(self.examples[k].targets) for k in self.rows[i])


def collate(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows and cut the columns that are padding in every row."""
    out = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    real = (out["segment_ids"] != PAD_SEGMENT).any(0).nonzero()
    width = int(real.max()) + 1 if real.numel() else 1
    return {k: v[:, :max(2, width)] for k, v in out.items()}


def file_sha256(path: "str | Path") -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
