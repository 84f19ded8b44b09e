"""Byte-level BPE tokenizer (HF ``tokenizers``), saved as a standard ``tokenizer.json``.

Byte-level means every string round-trips exactly (``decode(encode(x)) == x``), whatever its
unicode, with no unknown token: what code with odd whitespace and non-ASCII identifiers needs.
The paper's 2B validation models use an 8K vocabulary trained with HF tokenizers (section 4).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
RELEASED_BOS = "<｜begin▁of▁sentence｜>"  # the released deepseek-moe-16b tokenizer (ids 100000 and 100001)
RELEASED_EOS = "<｜end▁of▁sentence｜>"
# The chat template of the released deepseek-moe-16b-chat (and deepseek-llm-7b/67b-chat):
#   [system\n\n] User: {user}\n\nAssistant: {reply}<eos> User: ... \n\nAssistant:
# after the bos token, with no space or newline between a reply's eos and the next "User:".
RELEASED_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# Tried in order by eos_id() so an existing tokenizer.json (GPT-2, Llama, the release) works as well.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", RELEASED_EOS)
_N_BYTES = 256


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable, or a tokenizer lacks what the pipeline needs."""


def _limit_bytes(texts: Iterable[str], max_bytes: Optional[int]) -> Iterator[str]:
    seen = 0
    for t in texts:
        if max_bytes is not None and seen >= max_bytes:
            return
        seen += len(t.encode("utf-8"))
        yield t


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, max_bytes: Optional[int] = 50_000_000,
                    *, show_progress: bool = False,
                    specials: Sequence[str] = (EOS_TOKEN,)) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` (at most ``max_bytes`` of them, for speed).

    ``specials`` (by default ``EOS_TOKEN``) are the special tokens, ids 0, 1, ...; the 256 byte
    symbols are always in the vocabulary, so the result has exactly ``vocab_size`` entries when
    the text holds enough distinct merges. Training on 50 MB takes about 15 s on 2 cores.
    """
    if vocab_size < _N_BYTES + 2:
        raise ValueError(f"vocab_size must be at least {_N_BYTES + 2} (256 bytes + EOS + one merge), "
                         f"got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would break the exact round trip.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_limit_bytes(texts, max_bytes), trainer=trainer)
    return tok


def load_tokenizer(path: Union[str, "os.PathLike[str]"]) -> Tokenizer:
    """Load a ``tokenizer.json`` (or a folder holding one) with errors that name the file."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise TokenizerError(f"tokenizer file not found: {p}")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"{p} is not a valid tokenizer.json: {e}") from None


def save_tokenizer(tok: Tokenizer, path: Union[str, "os.PathLike[str]"]) -> None:
    """Write ``tok`` atomically (temporary file then rename), so a crash never leaves half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    try:
        tok.save(str(tmp))
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def eos_id(tok: Tokenizer) -> int:
    """The id of the end-of-text token (``EOS_TOKEN``, else a usual alternative)."""
    for name in _EOS_CANDIDATES:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise TokenizerError(f"tokenizer has no end-of-text token (looked for {', '.join(_EOS_CANDIDATES)})")


def special_tokens(checkpoint_dir: Union[str, "os.PathLike[str]"]) -> dict[str, Any]:
    """The bos / eos tokens and the chat template of the tokenizer in ``checkpoint_dir``.

    Returns ``bos_token``, ``bos_token_id``, ``eos_token``, ``eos_token_id`` (None where there
    is none), ``add_bos_token`` (whether prompts start with the bos token; False unless
    ``tokenizer_config.json`` says so) and ``chat_template`` (the Jinja template string, or None).

    The token strings come from ``tokenizer_config.json`` where it names them (a string or an
    ``{"content": ...}`` object, as the released checkpoints write), else from ``config.json``'s
    ``bos_token_id`` / ``eos_token_id``; ids are resolved through ``tokenizer.json``. Without
    either, the eos is the end-of-text token ``eos_id`` finds (this project's own tokenizers).
    The template is ``tokenizer_config.json``'s ``chat_template`` (the ``"default"`` one of a
    list of named templates), else a ``chat_template.jinja`` file. A token that
    ``tokenizer_config.json`` names but ``tokenizer.json`` lacks is a ``TokenizerError``.
    """
    folder = Path(checkpoint_dir)
    tok = load_tokenizer(folder)
    tok_cfg, model_cfg = read_tokenizer_config(folder), _json_object(folder / "config.json")
    found: dict[str, Any] = {}
    for kind in ("bos", "eos"):
        token = token_text(tok_cfg.get(f"{kind}_token"), f"{kind}_token of {folder / TOKENIZER_CONFIG_NAME}")
        if isinstance(token, str):
            token_id = tok.token_to_id(token)
            if token_id is None:
                raise TokenizerError(f"{folder / 'tokenizer_config.json'} names {kind}_token {token!r}, "
                                     f"which {folder / 'tokenizer.json'} does not have")
        else:
            token_id = model_cfg.get(f"{kind}_token_id")
            token = tok.id_to_token(token_id) if isinstance(token_id, int) else None
            token_id = token_id if token is not None else None
        found[f"{kind}_token"], found[f"{kind}_token_id"] = token, token_id
    if found["eos_token"] is None:
        try:
            found["eos_token_id"] = eos_id(tok)
            found["eos_token"] = tok.id_to_token(found["eos_token_id"])
        except TokenizerError:
            pass
    template = chat_template_of(tok_cfg)
    jinja = folder / "chat_template.jinja"
    if not isinstance(template, str) and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    found["add_bos_token"] = bool(tok_cfg.get("add_bos_token", False))
    found["chat_template"] = template if isinstance(template, str) else None
    return found


TOKENIZER_CONFIG_NAME = "tokenizer_config.json"


def read_tokenizer_config(folder: Union[str, "os.PathLike[str]"]) -> dict[str, Any]:
    """``folder/tokenizer_config.json`` as a dict; {} when there is none."""
    return _json_object(Path(folder) / TOKENIZER_CONFIG_NAME)


def token_text(value: object, what: str) -> Optional[str]:
    """The text of a special token as ``tokenizer_config.json`` writes it: a string, or an
    ``{"content": ...}`` object (an AddedToken); None when it is absent or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{what} must be a string or an object with a \"content\" string, got {value!r}")


def chat_template_of(tok_cfg: dict[str, Any]) -> Optional[str]:
    """The chat template a ``tokenizer_config.json`` holds: its ``chat_template`` string, or the
    ``"default"`` one of a list of named templates (newer transformers); None when absent."""
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) and template else None


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return obj


def tokenizer_sha256(tok: Tokenizer) -> str:
    """A fingerprint of the tokenizer's full definition (vocabulary, merges, pipeline)."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def encode_checked(tok: Tokenizer, text: str, what: str = "text") -> list[int]:
    """Token ids of ``text``, or ``TokenizerError`` naming what the tokenizer cannot encode: the
    text it maps to its unknown token, or characters it drops (decoding would not give them
    back). A byte-level BPE, as this project trains, encodes every string."""
    enc = tok.encode(text, add_special_tokens=False)
    decoded = tok.decode(enc.ids, skip_special_tokens=False)
    if decoded == text:
        return enc.ids
    unk = getattr(tok.model, "unk_token", None)
    unk_id = tok.token_to_id(unk) if unk else None
    bad = [text[s:e] for i, (s, e) in zip(enc.ids, enc.offsets) if unk_id is not None and i == unk_id]
    bad += sorted({c for c in text if not c.isspace() and c not in decoded} - set("".join(bad)))
    if bad:
        shown = ", ".join(f"{b!r} (U+{ord(b):04X})" if len(b) == 1 else repr(b)
                          for b in dict.fromkeys(bad[:8]))
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise TokenizerError(f"the {what} has text the tokenizer cannot encode: {shown}{more}")
    return enc.ids  # only normalisation (e.g. spacing) differs: nothing that matters is lost
