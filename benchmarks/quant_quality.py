"""What weight-only quantization costs a trained checkpoint: held-out loss and greedy tokens.

The checkpoint is written int8 and int4 with ``deepseek-moe quantize`` (into a temporary
directory), and each of fp32, bf16, int8 and int4 is scored on the test split of the run's own
corpus (a prefill: the many-row GEMM path) and asked for greedy continuations of prompts cut from
that split (decoding: one row at a time, the quantized kernels), compared token by token with
fp32's. One table; the goals of the quantized checkpoints (int8 within +0.5% of fp32's test
loss, int4 within +3%) are checked.

    python benchmarks/quant_quality.py runs/main                       # the main job's checkpoint
    python benchmarks/quant_quality.py RUN_OR_CKPT --prompts 16 --new 32 --max-tokens 20000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

GOALS = {"int8": 0.005, "int4": 0.03}  # relative test-loss increase over fp32


def prompts_from(cache, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens at evenly spaced offsets of the test split's domains."""
    toks = np.concatenate([np.asarray(cache.domain_tokens("test", d)) for d in cache.domains
                           if cache.meta["splits"]["test"]["domains"].get(d, {}).get("tokens", 0) > 0])
    if len(toks) < n * length:
        raise SystemExit(f"the test split has {len(toks)} tokens: too few for {n} prompts of {length}")
    starts = np.linspace(0, len(toks) - length, n).astype(int)
    return [toks[s:s + length].astype(np.int64).tolist() for s in starts]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a run directory or checkpoint trained by this package")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--max-tokens", type=int, default=None, help="test tokens scored per domain")
    ap.add_argument("--json", help="write the rows here too (a new file; --force replaces one)")
    ap.add_argument("--force", action="store_true", help="replace the --json file if it exists")
    args = ap.parse_args()
    if args.json and Path(args.json).exists() and not args.force:
        ap.error(f"{args.json} exists: pass --force to replace it")

    from deepseek_moe.evaluate import eval_cache, evaluate_splits
    from deepseek_moe.generate import generate
    from deepseek_moe.quantize import quantize_checkpoint
    from deepseek_moe.atomic import write_json_atomic
    from deepseek_moe.checkpoint import CheckpointError
    from deepseek_moe.runs import load_checkpoint, resolve_checkpoint, run_train_config

    torch.manual_seed(0)
    try:
        ckpt, run = resolve_checkpoint(args.checkpoint)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    settings = run_train_config(run)
    seq_len = settings.seq_len if settings is not None else 256
    cache = eval_cache(ckpt, run, progress=False)
    prompts = prompts_from(cache, args.prompts, args.prompt_len)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        quantized = {f"int{b}": quantize_checkpoint(ckpt, Path(tmp) / f"int{b}", b, progress=False) for b in (8, 4)}
        print(f"quantized {ckpt} to int8 and int4 in {time.perf_counter() - t0:.1f} s", flush=True)
        modes = [("fp32", ckpt, torch.float32), ("bf16", ckpt, torch.bfloat16),
                 ("int8", quantized["int8"], None), ("int4", quantized["int4"], None)]
        reference = None
        for mode, path, dtype in modes:
            model, _, _, _ = load_checkpoint(path, dtype=dtype)
            with torch.no_grad():
                report = evaluate_splits(model, cache, ("test",), seq_len, max_tokens=args.max_tokens,
                                         progress=False)
                tokens = generate(model, prompts, args.new, greedy=True)
            if reference is None:
                reference = tokens
            same = sum(a == b for r, t in zip(reference, tokens) for a, b in zip(r, t))
            total = sum(len(r) for r in reference)
            score = report.splits["test"]["all"]
            rows.append({"mode": mode, "test_loss": score.loss, "evaluated_tokens": score.evaluated,
                         "greedy_agreement": same / total})
            print(f"{mode}: test loss {score.loss:.4f}, greedy tokens equal to fp32's {same}/{total}", flush=True)
            del model
    fp32 = rows[0]["test_loss"]
    print(f"\n{ckpt}: test split, {rows[0]['evaluated_tokens']} tokens scored; greedy: {args.prompts} prompts "
          f"of {args.prompt_len} test tokens x {args.new} new tokens\n")
    print("| weights | test loss | vs fp32 | goal | greedy tokens equal to fp32's |")
    print("|---|---|---|---|---|")
    failed = []
    for r in rows:
        rel = r["test_loss"] / fp32 - 1
        goal = GOALS.get(r["mode"])
        ok = "" if goal is None else (f"<= +{goal:.1%} " + ("met" if rel <= goal else "NOT met"))
        if goal is not None and rel > goal:
            failed.append(r["mode"])
        r["relative_to_fp32"] = rel
        print(f"| {r['mode']} | {r['test_loss']:.4f} | {rel:+.3%} | {ok} | {r['greedy_agreement']:.2f} |")
    if args.json:
        write_json_atomic(Path(args.json), {"checkpoint": str(ckpt), "rows": rows})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
