"""lm-evaluation-harness adapter: the model type ``deepseek_moe``.

lm-eval is an optional extra (``pip install -r requirements-eval.txt``). lm-eval finds model types
only among the modules imported, so run it through this project's command, which imports this
module first and then hands every argument to lm-eval's own command line::

    deepseek-moe lm-eval --model deepseek_moe --model_args pretrained=runs/main --tasks hellaswag

or, from Python, ``import deepseek_moe.lm_eval_adapter`` before ``lm_eval.simple_evaluate(
model="deepseek_moe", model_args="pretrained=DIR")``. ``pretrained`` is a run directory, a
``checkpoints/`` folder or a checkpoint; other model_args: ``tokenizer`` (a tokenizer.json, default
the checkpoint's), ``device``, ``batch_size``, ``max_length``, ``max_memory`` (e.g. ``20GiB``;
default: what the machine has available).
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the lm-eval adapter needs lm-eval: pip install -r requirements-eval.txt "
        f"(lm-eval==0.4.13) ({e})"
    ) from None
from tqdm.auto import tqdm

from .generate import generate
from .multiple_choice import score_continuations
from .runs import load_checkpoint


def _int_or(value: Any, default: int) -> int:
    if value is None or (isinstance(value, str) and not value.isdigit()):
        return default  # "auto" and the like: a fixed batch is fine on CPU
    return int(value)


@register_model("deepseek_moe", "deepseek-moe")
class DeepseekMoELM(TemplateLM):
    """A DeepSeekMoE checkpoint behind lm-eval's LM interface (loglikelihood, loglikelihood_rolling,
    generate_until)."""

    def __init__(self, pretrained: str, tokenizer: Optional[str] = None, device: Optional[str] = None,
                 batch_size: Any = 16, max_length: Optional[int] = None, max_memory: Optional[str] = None,
                 **_: Any) -> None:
        super().__init__()
        from .data.tokenizer import eos_id

        import torch

        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # lm-eval's command line defaults to cuda
                print(f"deepseek_moe: {device} is not available, evaluating on cpu", file=sys.stderr)
            device = "cuda" if device is None and torch.cuda.is_available() else "cpu"
        model, tok, ckpt, _run = load_checkpoint(pretrained, device=device, tokenizer=tokenizer,
                                                 max_memory=max_memory)
        if tok is None:
            raise ValueError(f"{ckpt} has no tokenizer.json: pass model_args tokenizer=PATH")
        self.model, self.tokenizer, self.checkpoint = model, tok, ckpt
        self._device = model.model.embed_tokens.weight.device
        self._eot = eos_id(tok)
        self._batch_size = _int_or(batch_size, 16)
        self._max_length = int(max_length) if max_length else model.config.max_position_embeddings

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any):
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        return score_continuations(self.model, pairs, self._batch_size, self._max_length,
                                   progress=not disable_tqdm, desc="loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint windows of ``max_length`` tokens, the first
        conditioned on the end-of-text token."""
        pairs, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args[:1]
            tokens = self.tok_encode(text)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, self._eot, self._max_length, 1)):
                pairs.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        if pairs:
            for i, (lp, _) in zip(owner, score_continuations(
                    self.model, pairs, self._batch_size, self._max_length,
                    progress=not disable_tqdm, desc="loglikelihood_rolling")):
                totals[i] += lp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuation up to ``max_gen_toks`` tokens, cut
        at the first ``until`` string; the end-of-text token always stops."""
        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, kw = req.args[0], dict(req.args[1]) if len(req.args) > 1 else {}
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", 256))
            max_new = max(1, min(max_new, self._max_length - 1))
            prompt = (self.tok_encode(context) or [self._eot])[-(self._max_length - max_new):]
            sample = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 0) or 0) > 0
            ids = generate(self.model, [prompt], max_new, greedy=not sample,
                           temperature=float(kw.get("temperature", 1.0) or 1.0),
                           top_p=kw.get("top_p"), top_k=kw.get("top_k"),
                           stop_tokens=[self._eot], seed=kw.get("seed"))[0]
            if ids and ids[-1] == self._eot:
                ids = ids[:-1]
            text = self.tok_decode(ids)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """lm-eval's command line with the ``deepseek_moe`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
