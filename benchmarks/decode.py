"""Decoding with the KV cache vs recomputing the whole sequence at every step, measured in one run.

Both paths produce the same greedy continuation of one random prompt with a randomly initialised
model (fp32):

- ``cache``: ``deepseek_moe.generate.generate`` -- one prefill over the prompt, then one forward
  of a single token per step, attending over the cached keys and values;
- ``no cache``: at every step a full forward over the prompt and all tokens so far (the same
  tokens the cached run produced, so both do the same work whatever the argmax near-ties).

Token times come from the ``stream`` callback (``generate`` reads each token back to the host,
so the clock sees finished work). The first token costs a full forward of the prompt either
way; "decode" is the rate over the remaining ``new - 1`` tokens, "end to end" includes it.
Each figure is the median over ``--repeats`` after one warm-up, the two paths alternating
inside each repeat so that machine noise hits both alike.

    python benchmarks/decode.py                                   # deepseekmoe-tiny, 512 + 64
    python benchmarks/decode.py --prompt-len 1000 --new 16 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from deepseek_moe.generate import generate
from deepseek_moe.model import DeepseekForCausalLM
from deepseek_moe.presets import get_config

GOAL = 10.0  # cached / uncached decode rate


def run_cached(model: DeepseekForCausalLM, prompt: list[int], new: int) -> tuple[list[int], list[float]]:
    """Tokens and the time at which each was produced, from the call's start."""
    stamps: list[float] = []
    t0 = time.perf_counter()
    out = generate(model, [prompt], new, greedy=True,
                   stream=lambda row, tok: stamps.append(time.perf_counter() - t0))[0]
    return out, stamps


@torch.inference_mode()
def run_uncached(model: DeepseekForCausalLM, prompt: list[int], tokens: list[int]) -> tuple[int, list[float]]:
    """Recompute the full sequence for each of ``tokens``; returns argmax agreements and times."""
    stamps, agree = [], 0
    seq = torch.tensor([prompt + tokens], device=model.model.embed_tokens.weight.device)
    t0 = time.perf_counter()
    for i, tok in enumerate(tokens):
        logits = model(seq[:, : len(prompt) + i]).logits[0, -1]
        agree += int(logits.argmax()) == tok  # reads the result back, as generate does
        stamps.append(time.perf_counter() - t0)
    return agree, stamps


def rates(stamps: list[float]) -> tuple[float, float, float]:
    """(first-token seconds, decode tokens/s after the first, end-to-end tokens/s)."""
    n = len(stamps)
    decode = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else float("nan")
    return stamps[0], decode, n / stamps[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="deepseekmoe-tiny")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new", type=int, default=64, help="tokens to generate")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_config(args.preset)
    model = DeepseekForCausalLM(cfg).to(args.device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,)).tolist()

    tokens, _ = run_cached(model, prompt, args.new)  # warm-up; fixes the tokens to replay
    run_uncached(model, prompt, tokens[:2])
    cached, uncached, agree = [], [], 0
    for _ in range(args.repeats):
        out, stamps = run_cached(model, prompt, args.new)
        assert out == tokens, "greedy decoding is not deterministic"
        cached.append(rates(stamps))
        agree, stamps = run_uncached(model, prompt, tokens)
        uncached.append(rates(stamps))
    med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
    res = {
        "preset": args.preset, "device": args.device, "threads": torch.get_num_threads(),
        "prompt_len": args.prompt_len, "new_tokens": args.new, "batch": 1,
        "cache": {"first_token_s": med(cached, 0), "decode_tok_s": med(cached, 1),
                  "end_to_end_tok_s": med(cached, 2)},
        "no_cache": {"first_token_s": med(uncached, 0), "decode_tok_s": med(uncached, 1),
                     "end_to_end_tok_s": med(uncached, 2)},
        "argmax_agreement": f"{agree}/{len(tokens)}",
    }
    res["decode_ratio"] = res["cache"]["decode_tok_s"] / res["no_cache"]["decode_tok_s"]
    res["end_to_end_ratio"] = res["cache"]["end_to_end_tok_s"] / res["no_cache"]["end_to_end_tok_s"]

    print(f"{args.preset}, batch 1, {args.prompt_len}-token prompt + {args.new} new tokens, "
          f"{args.device} ({res['threads']} threads), median of {args.repeats}")
    print(f"{'':<10}{'first token':>13}{'decode tok/s':>14}{'end-to-end tok/s':>18}")
    for name in ("cache", "no_cache"):
        r = res[name]
        print(f"{name.replace('_', ' '):<10}{r['first_token_s'] * 1e3:>10.1f} ms"
              f"{r['decode_tok_s']:>14.1f}{r['end_to_end_tok_s']:>18.1f}")
    print(f"{'ratio':<10}{'':>13}{res['decode_ratio']:>13.1f}x{res['end_to_end_ratio']:>17.1f}x")
    verdict = "meets" if res["decode_ratio"] >= GOAL else "MISSES"
    print(f"decode ratio {res['decode_ratio']:.1f}x {verdict} the goal of {GOAL:.0f}x; "
          f"no-cache argmax agrees with the cached tokens on {res['argmax_agreement']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
