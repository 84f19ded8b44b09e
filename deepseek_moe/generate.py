"""Generation: one prefill over the prompts, then one token per step through a ``KVCache``.

Batched prompts of different lengths are padded on the left and carry an attention mask, so
every row's first real token sits at position 0 and padding is never attended to. A row stops
at its first stop token while the others go on; a stopped row keeps its slot in the batch but
feeds masked padding. Sampling runs in fp32 with an explicit ``torch.Generator`` when seeded:
temperature, then top-k, then top-p (nucleus) filtering.

Exactness: with the cache each step computes what a full forward over the whole sequence
computes (tests/test_generate.py holds it to 1e-5 in fp32). MoE routing is per token, so the
padding of other rows cannot change a row's experts -- except with a ``capacity_factor``, where
tokens compete for expert slots and the set of tokens in a forward decides which are dropped.

Shape legend: B batch (prompts), S padded prompt length, V vocab.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence, Union

import torch

from .model import DeepseekForCausalLM, KVCache

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TokenCallback = Callable[[int, int], None]  # (row, token_id)
TextCallback = Callable[[int, str], None]  # (row, new text)


def filter_logits(
    logits_BV: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None
) -> torch.Tensor:
    """``logits_BV`` with every token outside the top-k and outside the top-p nucleus at -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``
    (the most likely token is always kept).
    """
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV
        drop_BV = mass_before_BV >= top_p
        drop_BV[:, 0] = False
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), -math.inf)
    return logits_BV


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V); ``temperature`` 0 is greedy."""
    logits_BV = logits_BV.float()
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = filter_logits(logits_BV / temperature, top_k, top_p)
    return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator).squeeze(1)


def _token_ids(values: Iterable[object], what: str, vocab_size: int) -> list[int]:
    out = []
    for t in values:
        try:
            i = operator.index(t)  # ints (and numpy / 0-d torch ints), not floats
        except TypeError:
            raise ValueError(f"{what} must hold integer token ids, got {t!r}") from None
        if not 0 <= i < vocab_size:
            raise ValueError(f"{what}: token id {i} is out of range for vocab_size {vocab_size}")
        out.append(i)
    return out


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)):
            raise ValueError(
                f"prompts must be a list of token-id lists (for one prompt pass [ids]), "
                f"got {type(p).__name__} at index {i}"
            )
        if not p:
            raise ValueError(f"prompt {i} is empty; generation needs at least one token")
        out.append(_token_ids(p, f"prompt {i}", vocab_size))
    return out


def check_sampling(
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    **_: object,
) -> None:
    """ValueError unless ``max_new_tokens`` and the sampling arguments of ``generate`` are valid
    (the others, e.g. ``greedy`` and ``pad_id``, are left to ``generate``)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")


def _check_length(longest: int, max_new_tokens: int, max_positions: int) -> None:
    if longest + max_new_tokens > max_positions:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds "
            f"max_position_embeddings {max_positions}"
        )


def check_prompt_text(text: object, what: str = "prompt") -> str:
    """``text`` if it is a string that UTF-8 can encode, else a ValueError naming the problem.

    Command-line arguments that are not valid UTF-8 arrive (on POSIX) as strings with lone
    surrogates, which no tokenizer can take."""
    if not isinstance(text, str):
        raise ValueError(f"the {what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        where = (f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}")
        raise ValueError(f"the {what} is not valid UTF-8 text ({where} at character {e.start})") from None
    return text


@torch.inference_mode()
def generate(
    model: DeepseekForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    greedy: bool = False,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_tokens: Union[int, Iterable[int]] = (),
    seed: Optional[int] = None,
    pad_id: int = 0,
    stream: Optional[TokenCallback] = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns the new tokens per row.

    prompts: token-id lists, of any lengths (batched with left padding by ``pad_id``, whose
        value does not matter: padding is masked).
    temperature: softmax temperature; 0 (or ``greedy=True``) takes the argmax.
    top_k / top_p: keep the k most likely tokens / the smallest set reaching probability p.
    stop_tokens: a row ends after producing one of these; the stop token is the last of its
        returned ids (so a stopped row is told apart from one that ran out of tokens).
    seed: sample with a ``torch.Generator`` seeded so (reproducible); None uses torch's global RNG.
    stream: called as ``stream(row, token_id)`` for every new token, as it is produced.

    ``len(prompt) + max_new_tokens`` must not exceed ``config.max_position_embeddings``.
    """
    cfg = model.config
    V = cfg.vocab_size
    rows = _check_prompts(prompts, V)
    check_sampling(max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    longest = max(len(r) for r in rows)
    _check_length(longest, max_new_tokens, cfg.max_position_embeddings)
    (pad_id,) = _token_ids([pad_id], "pad_id", V)
    stops = set(_token_ids([stop_tokens] if isinstance(stop_tokens, int) else stop_tokens,
                           "stop_tokens", V))
    temperature = 0.0 if greedy else float(temperature)

    B = len(rows)
    new: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return new
    device = model.model.embed_tokens.weight.device
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)

    ids_BS = torch.full((B, longest), pad_id, dtype=torch.long)
    real_BS = torch.zeros(B, longest, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids_BS[b, longest - len(r):] = torch.tensor(r)
        real_BS[b, longest - len(r):] = True
    padded = not bool(real_BS.all())
    # The last sampled token is never fed back, hence the - 1.
    cache = KVCache.for_model(model, B, longest + max_new_tokens - 1)
    logits_BV = model(
        ids_BS.to(device), cache=cache, attention_mask=real_BS.to(device) if padded else None,
        routing_stats=False, logits_to_keep=1,
    ).logits[:, -1]

    plan = model.decode_plan(cache) if B == 1 else None  # one row of a quantized model: the fast path
    done = [False] * B
    for step in range(max_new_tokens):
        next_B = sample_next(logits_BV, temperature, top_k, top_p, generator)
        for b, t in enumerate(next_B.tolist()):
            if done[b]:
                continue
            new[b].append(t)
            if stream is not None:
                stream(b, t)
            done[b] = t in stops
        if all(done) or step == max_new_tokens - 1:
            break
        # Stopped rows feed masked padding: their keys are never attended to by anything.
        alive_B = torch.tensor([not d for d in done], device=device)
        input_B1 = torch.where(alive_B, next_B, pad_id).unsqueeze(1)
        mask_B1 = None if bool(alive_B.all()) else alive_B.unsqueeze(1)
        if plan is not None:
            logits_BV = model.decode_step(input_B1, cache, plan)[:, -1]
        else:
            logits_BV = model(input_B1, cache=cache, attention_mask=mask_B1, routing_stats=False).logits[:, -1]
    return new


class IncrementalDecoder:
    """Decoded text of a growing list of token ids, handed out as it grows.

    A byte-level BPE token can end in the middle of a multi-byte character, whose partial bytes
    decode to U+FFFD until the rest arrive: so the whole id list is decoded each time and the new
    suffix is held back while the text ends in U+FFFD. ``flush()`` hands out whatever is left.
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append a token; return the text that it completes (maybe empty)."""
        self.ids.append(token_id)
        text = self.text
        return "" if text.endswith("\ufffd") else self._emit(text)

    def flush(self) -> str:
        return self._emit(self.text)

    def _emit(self, text: str) -> str:
        piece, self.emitted = text[len(self.emitted):], text
        return piece


def default_stop_tokens(tokenizer: "Tokenizer", model: DeepseekForCausalLM) -> set[int]:
    """The tokenizer's end-of-text token and the config's ``eos_token_id``, those that exist."""
    from .data.tokenizer import TokenizerError, eos_id

    stops = set()
    eos = model.config.eos_token_id
    if eos is not None and 0 <= eos < model.config.vocab_size:
        stops.add(eos)
    try:
        stops.add(eos_id(tokenizer))
    except TokenizerError:
        pass
    return stops


def encode_prompts(
    model: DeepseekForCausalLM,
    tokenizer: "Tokenizer",
    prompt: Union[str, Sequence[str]],
    max_new_tokens: int = 128,
    **sampling: object,
) -> list[list[int]]:
    """The token ids of each prompt, once every input of ``generate_text`` has been checked:
    a ValueError (before any generation) for bad sampling arguments, text that is not valid
    UTF-8 or that the tokenizer cannot encode, an empty prompt, token ids beyond the model's
    vocabulary, or prompts too long for ``max_new_tokens`` more tokens."""
    from .data.tokenizer import encode_checked

    check_sampling(max_new_tokens, **sampling)  # type: ignore[arg-type]
    single = isinstance(prompt, str)
    texts = [prompt] if single else list(prompt)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    V = model.config.vocab_size
    prompts = []
    for i, t in enumerate(texts):
        what = "prompt" if single else f"prompt {i}"
        ids = encode_checked(tokenizer, check_prompt_text(t, what), what)
        if not ids:
            raise ValueError(f"the {what} ({t[:40]!r}) encodes to no tokens; give some text")
        if max(ids) >= V:
            raise ValueError(
                f"the tokenizer gives token id {max(ids)} but the model's vocab_size is {V}: "
                "is this the tokenizer the model was trained with?"
            )
        prompts.append(ids)
    _check_length(max(len(p) for p in prompts), max_new_tokens, model.config.max_position_embeddings)
    return prompts


def generate_text(
    model: DeepseekForCausalLM,
    tokenizer: "Tokenizer",
    prompt: Union[str, Sequence[str]],
    max_new_tokens: int = 128,
    *,
    stop_tokens: Optional[Iterable[int]] = None,
    stream: Optional[TextCallback] = None,
    **sampling: object,
) -> Union[str, list[str]]:
    """Continue ``prompt`` (a string, or a list of them batched together); returns the new text.

    Encodes with ``tokenizer`` (a HF ``tokenizers.Tokenizer``, e.g. from ``load_tokenizer``) and
    calls ``stream(row, text)`` with each newly decoded piece, e.g.
    ``stream=lambda row, s: print(s, end="", flush=True)``. ``stop_tokens`` defaults to
    ``default_stop_tokens``; a stop token ends its row and is not part of the text.
    ``sampling``: the keyword arguments of ``generate`` (temperature, greedy, top_k, top_p, seed).
    """
    single = isinstance(prompt, str)
    prompts = encode_prompts(model, tokenizer, prompt, max_new_tokens, **sampling)
    stops = default_stop_tokens(tokenizer, model) if stop_tokens is None else set(stop_tokens)
    decoders = [IncrementalDecoder(tokenizer) for _ in prompts]

    def on_token(row: int, token_id: int) -> None:
        if token_id in stops:
            return
        piece = decoders[row].add(token_id)
        if piece and stream is not None:
            stream(row, piece)

    generate(model, prompts, max_new_tokens, stop_tokens=stops, stream=on_token,
             **sampling)  # type: ignore[arg-type]
    for row, d in enumerate(decoders):
        piece = d.flush()
        if piece and stream is not None:
            stream(row, piece)
    out = [d.emitted for d in decoders]
    return out[0] if single else out
