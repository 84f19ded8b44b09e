#!/usr/bin/env python
"""Write a random checkpoint laid out like the deepseek-moe-16b hub snapshot.

    .venv/bin/python scripts/random_checkpoint.py OUT [--preset deepseekmoe-16b] [--chat]

The default is the released 16B config: 16.4B parameters, about 33 GB in bf16, written one
tensor at a time (peak memory about one shard plus one tensor). See
``deepseek_moe.random_checkpoint``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from deepseek_moe.checkpoint import CheckpointError
from deepseek_moe.presets import get_config
from deepseek_moe.random_checkpoint import DEFAULT_PRESET, write_random_checkpoint

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Write a random checkpoint in the layout of the deepseek-moe-16b hub "
                    "snapshot (config.json with auto_map, safetensors shards and index, "
                    "generation_config.json, remote-code stubs, tokenizer.json and "
                    "tokenizer_config.json), streamed one tensor at a time.")
    ap.add_argument("out", help="directory to create (must not exist or be empty)")
    ap.add_argument("--preset", default=DEFAULT_PRESET,
                    help=f"model config (default {DEFAULT_PRESET}, the released 16B config)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--shard-size", default="5GB",
                    help="largest shard, e.g. 5GB (the hub's default), 200MiB or bytes")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                    help="stored dtype (default bfloat16, as released)")
    ap.add_argument("--chat", action="store_true",
                    help="the -chat snapshot: add the released chat template to "
                         "tokenizer_config.json")
    ap.add_argument("--force", action="store_true",
                    help="replace a checkpoint already at OUT")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        config = get_config(args.preset)
        start = time.perf_counter()
        out = write_random_checkpoint(
            args.out, config, seed=args.seed, shard_bytes=args.shard_size,
            dtype=DTYPES[args.dtype], progress=not args.no_progress, force=args.force,
            chat=args.chat)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
