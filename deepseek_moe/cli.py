"""The ``deepseek-moe`` command.

    deepseek-moe presets                 list the named presets
    deepseek-moe params PRESET [...]     total / activated parameters and FLOPs per token
    deepseek-moe main [--preset P]       the main job (today: build a preset, run it on real text)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from . import __version__


def cmd_presets(args: argparse.Namespace) -> int:
    from .presets import preset_description, preset_names

    for name in preset_names(include_aliases=args.all):
        print(f"{name:<22} {preset_description(name)}")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    """Print the parameter table of each preset (and a one-line summary when several)."""
    from .params import count_parameters, format_report, human
    from .presets import get_config

    reports = [count_parameters(get_config(name)) for name in args.presets]
    if len(reports) == 1:
        print(format_report(reports[0], args.seq_len))
        return 0
    print(f"{'preset':<22}{'total':>10}{'activated':>11}{'experts':>10}{'train FLOP/tok':>16}")
    for r in reports:
        fl = r.flops_per_token(args.seq_len)["train"]
        print(
            f"{r.config.name:<22}{human(r.total):>10}{human(r.active):>11}"
            f"{human(r.expert_params):>10}{human(fl, 'F'):>16}"
        )
    return 0


def default_text() -> tuple[str, str]:
    """Real text that every install has: a module of Python's standard library."""
    import argparse as _mod

    path = Path(_mod.__file__)
    return str(path), path.read_text(encoding="utf-8")


def cmd_main(args: argparse.Namespace) -> int:
    """Build a preset, print its parameter table and run a forward + backward pass on real text.

    Text is encoded as UTF-8 bytes (token ids 0..255) until the BPE tokenizer lands.
    """
    import torch

    from .model import DeepseekForCausalLM
    from .params import count_parameters, format_report
    from .presets import get_config

    torch.manual_seed(args.seed)
    cfg = get_config(args.preset, dispatch=args.dispatch)
    print(format_report(count_parameters(cfg), args.seq_len))
    source, text = default_text() if args.text is None else (args.text, Path(args.text).read_text())
    ids = list(text.encode("utf-8"))
    need = args.batch_size * args.seq_len
    if len(ids) < need:
        raise SystemExit(f"{source}: {len(ids)} bytes, need {need} for the batch")
    x = torch.tensor(ids[:need]).view(args.batch_size, args.seq_len)
    print(f"\ntext: {source} ({len(ids):,} bytes); batch {args.batch_size} x {args.seq_len}")
    model = DeepseekForCausalLM(cfg)
    t0 = time.perf_counter()
    out = model(x, labels=x)
    out.loss.backward()
    dt = time.perf_counter() - t0
    print(f"forward+backward: {dt * 1000:.0f} ms ({need / dt:,.0f} tokens/s)")
    print(f"LM loss {out.lm_loss.item():.4f} (ln V = {torch.log(torch.tensor(float(cfg.vocab_size))):.4f})")
    if cfg.has_moe:
        print(f"weighted balance loss {out.aux_loss.item():.6f}")
        print(f"{'MoE layer':<10}{'expert bal':>11}{'device bal':>11}{'load CV':>9}{'max/mean':>9}"
              f"{'idle':>6}{'dropped':>8}")
        for j, layer in enumerate(cfg.moe_layers):
            load = out.tokens_per_expert[j].float()
            cv = (load.std(unbiased=False) / load.mean()).item()
            print(
                f"{layer:<10}{out.expert_balance_loss[j].item():>11.4f}"
                f"{out.device_balance_loss[j].item():>11.4f}{cv:>9.3f}"
                f"{(load.max() / load.mean()).item():>9.2f}{int((load == 0).sum()):>6}"
                f"{int(out.dropped_tokens[j]):>8}"
            )
    if args.save:
        from .checkpoint import load_pretrained, save_pretrained

        save_pretrained(model, args.save)
        reloaded = load_pretrained(args.save, dispatch=args.dispatch)
        with torch.no_grad():
            same = torch.equal(reloaded(x).logits, model(x).logits)
        print(f"saved {args.save} in the released layout; reloaded logits identical: {same}")
        if not same:
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepseek-moe",
        description="DeepSeekMoE (Dai et al. 2024): models, baselines and tools.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("presets", help="list the named presets")
    sp.add_argument("--all", action="store_true", help="include aliases")
    sp.set_defaults(func=cmd_presets)

    sp = sub.add_parser("params", help="total and activated parameters, FLOPs per token")
    sp.add_argument("presets", nargs="+", metavar="PRESET", help="preset name(s); see `presets`")
    sp.add_argument("--seq-len", type=int, default=None,
                    help="sequence length for attention FLOPs (default: the preset's context)")
    sp.set_defaults(func=cmd_params)

    sp = sub.add_parser("main", help="the main job: build a preset and run it on real text")
    sp.add_argument("--preset", default="deepseekmoe-tiny")
    sp.add_argument("--text", default=None, help="a UTF-8 text file (default: a stdlib module)")
    sp.add_argument("--batch-size", type=int, default=4)
    sp.add_argument("--seq-len", type=int, default=256)
    sp.add_argument("--dispatch", choices=("fast", "reference"), default="fast")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--save", default=None, metavar="DIR",
                    help="also save the model in the released layout and check it reloads")
    sp.set_defaults(func=cmd_main)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
