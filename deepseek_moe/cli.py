"""The ``deepseek-moe`` command.

    deepseek-moe presets                 list the named presets
    deepseek-moe params PRESET [...]     total / activated parameters and FLOPs per token
    deepseek-moe train --preset P --out DIR  train with the paper's recipe (--resume continues)
    deepseek-moe generate CKPT --prompt  continue a prompt, streaming the text
    deepseek-moe chat CKPT               chat with a chat model, streaming its replies
    deepseek-moe eval CKPT               held-out loss, perplexity, bits per byte; multiple choice
    deepseek-moe analyze CKPT            the paper's expert analyses (Fig. 4, Fig. 5, shared, load)
    deepseek-moe lm-eval ARGS...         lm-evaluation-harness with the deepseek_moe model type
    deepseek-moe export CKPT OUT         any checkpoint layout -> the released layout (or qwen2_moe)
    deepseek-moe quantize CKPT OUT --bits 8|4  weight-only int8 / int4 checkpoint
    deepseek-moe reproduce EXP --out D   the paper's comparisons at small scale, with a report
    deepseek-moe main                    the main job: train the tiny DeepSeekMoE for a few minutes
"""

from __future__ import annotations

import argparse
import sys
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
    if args.lora_rank:
        from .finetune import lora_parameter_count
        from .tables import format_table

        for name in args.presets:
            c = lora_parameter_count(get_config(name), args.lora_rank)
            rows = [[t, f"{c[t]:,}", f"{c[t] / c['model']:.3%}"] for t in ("attention", "experts", "shared", "mlp", "total")]
            print(f"{name}: LoRA rank {args.lora_rank} trains {c['total']:,} of {c['model']:,} parameters")
            print(format_table([["adapters on", "parameters", "of the model"], *rows]))
        return 0
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


def _train_config(args: argparse.Namespace):
    from .train_config import TrainConfig, from_args

    return from_args(args, TrainConfig)


def _summary(result) -> str:
    import math

    lines = [
        "",
        f"run:             {result.out}",
        f"steps:           {result.step} of {result.total_steps}"
        + (" (interrupted; continue with --resume)" if result.interrupted else ""),
        f"tokens trained:  {result.tokens:,} in {result.seconds / 60:.1f} min",
    ]
    if result.budget_seconds is not None:
        lines.append(f"training loop:   {result.train_seconds / 60:.2f} min of a "
                     f"{result.budget_seconds / 60:.2f} min budget")
    if result.val_loss is not None:
        lines.append(f"validation loss: {result.val_loss:.4f} (perplexity {math.exp(result.val_loss):.1f})")
    if result.checkpoint is not None:
        lines.append(f"checkpoint:      {result.checkpoint}")
    lines.append(f"metrics:         {result.out / 'metrics.jsonl'}")
    for p in result.plots:
        lines.append(f"plot:            {p}")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a preset on the default corpus (or your text) with the paper's recipe."""
    from .train import train

    import os

    result = train(_train_config(args), resume=args.resume, force=args.force)
    if os.environ.get("RANK", "0") == "0":
        print(_summary(result))
    return 130 if result.interrupted else 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a checkpoint on conversations or prompt/completion pairs (JSONL): full, or LoRA
    on attention and every expert (--lora-rank R). The loss counts only the assistant
    (completion) tokens; examples are packed without attention across them. Defaults: the paper's
    alignment recipe for DeepSeekMoE 16B Chat (constant lr 1e-5, 8 epochs, rows of 4K tokens)."""
    import os

    from .finetune import FinetuneConfig, finetune
    from .train_config import from_args

    cfg = from_args(args, FinetuneConfig, checkpoint=args.checkpoint)
    result = finetune(cfg, resume=args.resume, force=args.force)
    if os.environ.get("RANK", "0") == "0":
        print(_summary(result))
    return 130 if result.interrupted else 0


def next_free_dir(base: str) -> str:
    """``base`` when it is new or empty, else the first of ``base-2``, ``base-3`` ... that is."""
    from pathlib import Path

    def free(p: Path) -> bool:
        return not p.exists() or (p.is_dir() and not any(p.iterdir()))

    if free(Path(base)):
        return base
    n = 2
    while not free(Path(f"{base}-{n}")):
        n += 1
    return f"{base}-{n}"


def cmd_main(args: argparse.Namespace) -> int:
    """The main job: `train` of the tiny DeepSeekMoE; each run without --out gets a new folder
    (runs/main, then runs/main-2, ...), so running it again never touches an earlier run."""
    if args.out is None:
        args.out = next_free_dir("runs/main")
    return cmd_train(args)


def _sampling(args: argparse.Namespace) -> dict:
    """``generate``'s sampling arguments from the command line (temperature 0: greedy)."""
    return dict(greedy=args.temperature == 0, temperature=args.temperature or 1.0,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _chat_template(args: argparse.Namespace):
    """The chat template of --template or of the checkpoint's tokenizer_config.json, read before
    the (slow) load of the weights."""
    from .chat import load_chat_template
    from .runs import resolve_checkpoint

    return load_chat_template(resolve_checkpoint(args.checkpoint)[0], args.template, args.tokenizer)


def _load_for_generation(args: argparse.Namespace):
    """``(model, tokenizer)`` of ``generate`` and ``chat``: a checkpoint needs a tokenizer."""
    from .runs import load_checkpoint

    model, tokenizer, ckpt, _ = load_checkpoint(args.checkpoint, device=args.device,
                                                tokenizer=args.tokenizer, max_memory=args.max_memory,
                                                dtype=_weights_dtype(args))
    if tokenizer is None:
        raise ValueError(f"{ckpt} has no tokenizer.json: pass --tokenizer")
    return model, tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue a prompt with a checkpoint, streaming the text as it is produced. With --chat, the
    prompt is one user message in the checkpoint's chat template and only the reply is printed."""
    from .generate import check_prompt_text, check_sampling, encode_prompts, generate_text

    sampling = _sampling(args)
    check_sampling(args.max_new_tokens, **sampling)  # before the (slow) load
    check_prompt_text(args.prompt)
    if args.template is not None and not args.chat:
        raise ValueError("--template is for --chat")
    template = _chat_template(args) if args.chat else None
    model, tokenizer = _load_for_generation(args)
    if template is not None:
        from .chat import ChatSession

        session = ChatSession(model, tokenizer, template, args.max_new_tokens, **sampling)
        session.add_user(args.prompt)
        session.reply(stream=lambda text: print(text, end="", flush=True))
        print()
        return 0
    encode_prompts(model, tokenizer, args.prompt, args.max_new_tokens, **sampling)
    print(args.prompt, end="", flush=True)  # only once every input is known to be good
    generate_text(model, tokenizer, args.prompt, args.max_new_tokens,
                  stream=lambda row, text: print(text, end="", flush=True), **sampling)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with a chat model, streaming its replies: each line you type is a user message, and
    the whole conversation, rendered with the checkpoint's chat template (tokenizer_config.json,
    or --template), is what the next reply continues. /reset clears the conversation, /exit (or
    Ctrl-D) quits, /help lists the commands; Ctrl-C stops a reply, keeping what it said so far.
    The oldest turns are dropped, with a note, once the conversation and --max-new-tokens no
    longer fit the model's max_position_embeddings (a system message stays)."""
    from .chat import ChatSession, chat_loop
    from .generate import check_sampling

    sampling = _sampling(args)
    check_sampling(args.max_new_tokens, **sampling)  # before the (slow) load
    template = _chat_template(args)
    model, tokenizer = _load_for_generation(args)
    session = ChatSession(model, tokenizer, template, args.max_new_tokens, system=args.system, **sampling)
    interactive = sys.stdin.isatty()
    if interactive:
        print("/help lists the commands; Ctrl-D quits", file=sys.stderr)
    return chat_loop(session, prompt=">>> " if interactive else "")


def _weights_summary(model) -> str:
    """How the weights are held, e.g. ``bfloat16, per-expert`` or ``int4, per-expert``."""
    from .moe.experts import ExpertList
    from .quant import quantized_layers

    bits = next((m.bits for m in quantized_layers(model)), None)
    kind = f"int{bits}" if bits else str(model.lm_head.weight.dtype).removeprefix("torch.")
    per_expert = any(isinstance(m, ExpertList) for m in model.modules())
    return kind + (", per-expert tensors" if per_expert else "")


def _weights_dtype(args: argparse.Namespace):
    import torch

    return None if args.dtype == "auto" else getattr(torch, args.dtype)


def _out_dir(args: argparse.Namespace, ckpt, run, kind: str):
    from pathlib import Path

    if args.out:
        return Path(args.out)
    return (run / kind) if run is not None else Path(f"{kind}-{ckpt.name}")


def _data_label(args: argparse.Namespace):
    """None on the run's own corpus; else a name for results on other text, so that they are
    written beside the run's own results, never over them."""
    import hashlib

    from .data.corpus import parse_user_path

    if args.text:
        first = parse_user_path(args.text[0])[1]
        h = hashlib.sha256("\0".join(args.text).encode()).hexdigest()[:8]
        more = f"-and-{len(args.text) - 1}" if len(args.text) > 1 else ""
        return f"text-{first.stem or first.name}{more}-{h}"
    if args.sources is not None:
        return "sources-" + ("-".join(args.sources) or "none")
    return None


def _add_data_args(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("held-out data (default: the run's corpus, with the checkpoint's tokenizer)")
    g.add_argument("--data-dir", default=None, help="data folder (default: the run's)")
    g.add_argument("--sources", nargs="*", default=None, help="built-in sources (default: the run's)")
    g.add_argument("--text", action="append", default=None, metavar="PATH",
                   help="evaluate exactly this text instead of the run's held-out data (repeatable; "
                   "results go beside the run's, as eval-text-NAME.json / analysis-text-NAME/)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (default: the one inside the checkpoint)")
    g = sp.add_argument_group("run")
    g.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's, else 256)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="score at most about N tokens per domain and split (default: all)")
    g.add_argument("--out", default=None, help="output folder (default: RUN/eval or RUN/analysis)")
    g.add_argument("--device", default="cpu")
    _add_weights_args(g)
    g.add_argument("--no-progress", action="store_true")


def _load_for_eval(args: argparse.Namespace, need_data: bool = True, check=None):
    from .evaluate import check_text_files, eval_cache, text_cache
    from .runs import TOKENIZER_NAME, load_checkpoint, run_train_config

    only_text = bool(args.text) and args.sources is None
    if only_text and need_data:
        check_text_files(args.text)  # before loading anything
    model, tok, ckpt, run = load_checkpoint(args.checkpoint, device=args.device, tokenizer=args.tokenizer,
                                            max_memory=args.max_memory, dtype=_weights_dtype(args))
    if check is not None:
        check(model)  # before any data work
    settings = run_train_config(run)
    seq_len = args.seq_len or (settings.seq_len if settings is not None else 256)
    seq_len = min(seq_len, model.config.max_position_embeddings)
    cache = None
    if need_data and only_text:  # exactly the given text, in a temporary cache of its own
        tok_path = args.tokenizer or ckpt / TOKENIZER_NAME
        cache = text_cache(args.text, tok_path, progress=not args.no_progress)
    elif need_data:
        cache = eval_cache(ckpt, run, args.tokenizer, data_dir=args.data_dir, sources=args.sources,
                           paths=args.text, progress=not args.no_progress)
        if tok is not None and cache.vocab_size != tok.get_vocab_size():
            raise ValueError("the data cache and the checkpoint use different tokenizers")
    print(f"checkpoint: {ckpt} ({model.config.name or 'model'}, "
          f"{model.num_parameters() / 1e6:.1f}M parameters, {_weights_summary(model)})")
    return model, tok, ckpt, run, cache, seq_len


def cmd_eval(args: argparse.Namespace) -> int:
    """Held-out loss, perplexity and bits per byte (overall and per domain), and multiple-choice
    accuracy: the built-in offline task `continuation` and/or JSONL files in the published
    HellaSwag / PIQA / ARC formats (--tasks hellaswag=PATH ...). Writes eval.json beside a table."""
    from pathlib import Path

    from .data.tokenizer import eos_id
    from .atomic import write_json_atomic
    from .evaluate import TEXT_SPLIT, evaluate_splits
    from .multiple_choice import builtin_task, evaluate_multiple_choice, load_task_file

    tasks = []
    for spec in args.tasks:
        name, _, path = spec.partition("=")
        if spec == "continuation":
            tasks.append(("continuation", None))
        elif path:
            tasks.append((name, Path(path)))
        elif Path(spec).suffix in (".jsonl", ".json") or Path(spec).is_file():
            tasks.append((Path(spec).stem, Path(spec)))
        else:
            raise ValueError(f"unknown task {spec!r}: use `continuation` (built in) or NAME=FILE.jsonl")
    for _, p in tasks:
        if p is not None and not p.is_file():
            raise ValueError(f"task file {p} does not exist")
    need_data = bool(args.splits) or any(p is None for _, p in tasks)
    model, tok, ckpt, run, cache, seq_len = _load_for_eval(args, need_data)
    out_dir = _out_dir(args, ckpt, run, "eval")
    label = _data_label(args)
    result: dict = {"checkpoint": str(ckpt), "model": model.config.name}
    if label is not None:
        result["data"] = {"text": args.text or [], "sources": args.sources}
    split_names = args.splits
    if args.text and args.sources is None:  # all of the given text, reported as split "text"
        split_names = [TEXT_SPLIT] if args.splits else []
    if split_names:
        report = evaluate_splits(model, cache, split_names, seq_len, args.batch_size, args.max_tokens,
                                 progress=not args.no_progress, checkpoint=str(ckpt))
        if split_names == [TEXT_SPLIT] and split_names != args.splits:
            report.splits = {"text": report.splits[TEXT_SPLIT]}
        result["loss"] = report.to_dict()
        print(report.format())
    if tasks:
        if tok is None:
            raise ValueError(f"{ckpt} has no tokenizer.json: multiple choice needs --tokenizer")
        from .tables import format_table

        rows = [("task", "n", "acc", "acc_norm")]
        result["multiple_choice"] = {}
        for name, path in tasks:
            if path is None:
                examples = builtin_task(cache, split=split_names[0] if split_names == [TEXT_SPLIT] else "validation",
                                        per_domain=args.mc_per_domain, seed=args.mc_seed)
            else:
                fmt, examples = load_task_file(path, limit=args.limit)
                name = f"{name} ({fmt})"
            r = evaluate_multiple_choice(model, examples, tok, task=name, batch_size=args.batch_size,
                                         progress=not args.no_progress, eos_id=eos_id(tok))
            result["multiple_choice"][name] = r.to_dict()
            rows.append((name, str(r.n), f"{r.acc:.4f}", f"{r.acc_norm:.4f}"))
            for g, v in r.groups.items():
                rows.append((f"  {g}", str(v["n"]), f"{v['acc']:.4f}", f"{v['acc_norm']:.4f}"))
        print()
        print(format_table(rows))
    path = out_dir / ("eval.json" if label is None else f"eval-{label}.json")
    write_json_atomic(path, result)
    print(f"\nwrote {path}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """The paper's expert-specialisation analyses on an MoE checkpoint: disable the top routed
    experts (Fig. 4), vary the activated routed experts (Fig. 5), drop the shared expert(s), and
    expert load / routing entropy by domain. A table each, a PNG each, analysis.json."""
    from .analyze import analyze, check_moe
    from .atomic import write_json_atomic
    from .evaluate import TEXT_SPLIT
    from .plots import plot_analysis

    model, _, ckpt, run, cache, seq_len = _load_for_eval(args, need_data=True, check=check_moe)
    split = TEXT_SPLIT if args.text and args.sources is None else args.split  # all of the given text
    res = analyze(model, cache, analyses=args.analyses, split=split, seq_len=seq_len,
                  batch_size=args.batch_size, max_tokens=args.max_tokens or 32768, ks=args.k,
                  progress=not args.no_progress)
    label = _data_label(args)
    out_dir = _out_dir(args, ckpt, run, "analysis" if label is None else f"analysis-{label}")
    plot_analysis(res, out_dir)
    write_json_atomic(out_dir / "analysis.json", res.to_dict())
    (out_dir / "analysis.md").write_text(res.format() + "\n")
    print(res.format())
    print()
    for p in res.plots + [str(out_dir / "analysis.json")]:
        print(f"wrote {p}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Train the models of one of the paper's comparisons (tiny presets, same data, same recipe,
    several seeds), evaluate them on the test split and write a report with the paper's numbers,
    the seed spread, plots and a verdict per claim. Runs again reuse finished models and resume
    unfinished ones."""
    from pathlib import Path

    from .reproduce import Settings, reproduce

    kw = {k: v for k, v in (("seeds", args.seeds), ("tokens", args.tokens), ("lr", args.lr),
                            ("data_dir", args.data_dir)) if v is not None}
    kw.update(scale=args.scale, progress=not args.no_progress, device=args.device, bf16_autocast=args.bf16)
    if args.lr_sweep is not None:
        kw["lr_sweep"] = tuple(args.lr_sweep or (0.5, 1.0, 2.0, 4.0))
    if args.sweep_tokens is not None:
        kw["sweep_tokens"] = args.sweep_tokens
    if args.sweep_seed is not None:
        kw["sweep_seed"] = args.sweep_seed
    if args.warmup_steps is not None:
        kw["warmup_steps"] = args.warmup_steps
    if args.sweep_only:
        kw["sweep_only"] = True
    if args.models:
        kw["models"] = tuple(args.models)
    if args.set:
        from .train_config import parse_overrides

        kw["extra_overrides"] = parse_overrides(args.set)
    if args.sources is not None:
        kw["sources"] = tuple(args.sources)
    if args.text:
        kw["paths"] = tuple(args.text)
    s = Settings.quick(**kw) if args.quick else Settings(**kw)
    reproduce(args.experiment, Path(args.out), s)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a checkpoint of any layout (a distributed run's sharded dcp/ state, or a
    single-process one) as the released single-directory layout, or (--format qwen2_moe) as a
    Qwen2-MoE checkpoint that stock transformers, vLLM and llama.cpp's converter load without
    remote code, with its tokenizer. OUT must be new or empty; --force replaces an earlier
    export, never a training checkpoint, a run or another folder."""
    from pathlib import Path

    from .parallel.checkpoint import export_released
    from .runs import resolve_checkpoint

    ckpt, _ = resolve_checkpoint(args.checkpoint)
    if args.format == "qwen2_moe":
        from .hf_export import export_qwen2_moe
        from .parallel.checkpoint import check_export_target, model_of

        check_export_target(ckpt, Path(args.out), args.force)
        out = export_qwen2_moe(model_of(ckpt), Path(args.out), tokenizer_dir=ckpt)
    else:
        out = export_released(ckpt, Path(args.out), force=args.force)
    print(f"exported {ckpt} -> {out} ({args.format})")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Write a checkpoint with weight-only int8 (per output channel) or int4 (groups of
    --group-size inputs) linear layers, converted tensor by tensor (peak memory about one output
    shard). Every command loads the result. OUT must be new or empty; --force replaces a
    checkpoint there."""
    import time
    from pathlib import Path

    from .quantize import quantize_checkpoint
    from .runs import resolve_checkpoint

    ckpt, _ = resolve_checkpoint(args.checkpoint)
    t0 = time.perf_counter()
    out = quantize_checkpoint(ckpt, Path(args.out), args.bits, args.group_size, shard_size=args.shard_size,
                              force=args.force, progress=not args.no_progress)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"quantized {ckpt} -> {out}: int{args.bits}, {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    """Run lm-evaluation-harness with the `deepseek_moe` model type registered; every argument
    goes to lm-eval (e.g. --model_args pretrained=RUN --tasks hellaswag)."""
    try:
        from .lm_eval_adapter import main as lm_eval_main
    except ImportError as e:
        raise ValueError(str(e)) from None
    rest = list(args.args)
    if "--model" not in rest and not any(a.startswith("--model=") for a in rest):
        rest = ["--model", "deepseek_moe", *rest]
    return lm_eval_main(rest)


def _add_train_args(sp: argparse.ArgumentParser, cls=None, **defaults) -> None:
    """``train``'s options: one per ``TrainConfig`` field (``train_config.add_arguments``; ``cls``
    a subclass for another command), and what to do with an output folder that holds a run."""
    from .train_config import TrainConfig, add_arguments

    add_arguments(sp, cls or TrainConfig, **defaults)
    g = sp.add_argument_group("the output folder")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest whole checkpoint in --out (skipping damaged ones)")
    g.add_argument("--force", action="store_true",
                   help="start over in a used --out: delete the previous run's checkpoints, metrics "
                   "and plots (with --resume: only when there is no checkpoint to resume)")


def _add_generation_args(sp: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The tokenizer, chat template, sampling and device options of ``generate`` and ``chat``."""
    sp.add_argument("--tokenizer", default=None,
                    help="tokenizer.json (default: the one inside the checkpoint)")
    sp.add_argument("--template", default=None, metavar="FILE",
                    help="a jinja chat template instead of the one in tokenizer_config.json "
                    "(`released`: the released deepseek-moe-16b-chat template)")
    sp.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    sp.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    sp.add_argument("--top-k", type=int, default=None)
    sp.add_argument("--top-p", type=float, default=0.95)
    sp.add_argument("--seed", type=int, default=None)
    sp.add_argument("--device", default="cpu")
    _add_weights_args(sp)


def _add_weights_args(g) -> None:
    """How a command holds the checkpoint's weights: the memory budget and the dtype."""
    g.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget for the weights, e.g. 20GiB (default: what this machine has available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the weights' dtype (default: float32 on the CPU when that fits the memory budget, "
                   "else as stored, memory-mapped)")


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
    sp.add_argument("--lora-rank", type=int, default=0, metavar="R",
                    help="instead: the trainable parameters of LoRA rank R on each target (finetune)")
    sp.set_defaults(func=cmd_params)

    sp = sub.add_parser("train", help="train a preset with the paper's recipe",
                        description=cmd_train.__doc__)
    _add_train_args(sp)
    sp.set_defaults(func=cmd_train)

    from .finetune import FinetuneConfig

    sp = sub.add_parser("finetune", help="fine-tune a checkpoint on conversations (full or LoRA)",
                        description=cmd_finetune.__doc__)
    sp.add_argument("checkpoint", help="a checkpoint, its run directory, or a released snapshot")
    _add_train_args(sp, FinetuneConfig)
    sp.set_defaults(func=cmd_finetune)

    sp = sub.add_parser("generate", help="continue a prompt with a checkpoint (streams text)",
                        description=cmd_generate.__doc__)
    sp.add_argument("checkpoint", help="a run directory, its checkpoints/ folder, or a checkpoint")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--chat", action="store_true",
                    help="the prompt is one user message in the chat template; print only the reply")
    _add_generation_args(sp, max_new_tokens=64)
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("chat", help="chat with a chat model (streams replies)",
                        description=cmd_chat.__doc__)
    sp.add_argument("checkpoint", help="a run directory, its checkpoints/ folder, or a checkpoint")
    sp.add_argument("--system", default=None, help="a system message that opens the conversation")
    _add_generation_args(sp, max_new_tokens=256)
    sp.set_defaults(func=cmd_chat)

    sp = sub.add_parser("eval", help="held-out loss / perplexity / bits per byte; multiple choice",
                        description=cmd_eval.__doc__)
    sp.add_argument("checkpoint", help="a run directory, its checkpoints/ folder, or a checkpoint")
    sp.add_argument("--splits", nargs="*", default=["validation", "test"],
                    help="held-out splits for the loss (none: skip the loss)")
    sp.add_argument("--tasks", nargs="*", default=["continuation"], metavar="TASK",
                    help="multiple-choice tasks: `continuation` (built in, offline) and/or "
                    "NAME=FILE.jsonl in HellaSwag/PIQA/ARC format (none: skip)")
    sp.add_argument("--mc-per-domain", type=int, default=100,
                    help="questions per domain of the built-in task")
    sp.add_argument("--mc-seed", type=int, default=0)
    sp.add_argument("--limit", type=int, default=None, help="first N questions of each task file")
    _add_data_args(sp)
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("analyze", help="the paper's expert analyses, with plots",
                        description=cmd_analyze.__doc__)
    sp.add_argument("checkpoint", help="a run directory, its checkpoints/ folder, or a checkpoint")
    sp.add_argument("--analyses", nargs="*", default=["disable_top", "top_k", "shared", "load", "paths"],
                    choices=["disable_top", "top_k", "shared", "load", "paths"],
                    help="paths: the shared and the routed experts' share of each MoE layer's output")
    sp.add_argument("--k", type=int, nargs="*", default=None,
                    help="routed k values for the Fig. 5 sweep (default 1 .. trained k + 2)")
    sp.add_argument("--split", default="validation")
    _add_data_args(sp)
    sp.set_defaults(func=cmd_analyze)

    sp = sub.add_parser("reproduce", help="the paper's comparisons at small scale, with a report",
                        description=cmd_reproduce.__doc__)
    sp.add_argument("experiment", choices=["table1", "fig3", "shared-ratio", "upper-bound", "fig4-fig5"])
    sp.add_argument("--out", required=True, help="output folder (runs are reused from it)")
    sp.add_argument("--seeds", type=int, default=None, help="seeds per model (default 3; --quick 2)")
    sp.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    sp.add_argument("--scale", type=int, default=1, help="widths x S and tokens x S^2 (for a GPU)")
    sp.add_argument("--tokens", type=int, default=None, help="training tokens per run")
    sp.add_argument("--lr", type=float, default=None)
    sp.add_argument("--lr-sweep", nargs="*", type=float, default=None, metavar="FACTOR",
                    help="first sweep each model's rate over these factors of --lr (one seed, a shorter "
                    "budget, validation loss), then run the experiment at the one rate and at each model's "
                    "best; the report shows both (default factors: 0.5 1 2 4)")
    sp.add_argument("--sweep-tokens", type=int, default=None, help="tokens per sweep run (default: half "
                    "of --tokens)")
    sp.add_argument("--sweep-seed", type=int, default=None, help="the sweep's seed (default 0)")
    sp.add_argument("--warmup-steps", type=int, default=None,
                    help="linear warmup steps of every run (default: train's, about 10%% of the run)")
    sp.add_argument("--sweep-only", action="store_true",
                    help="stop after the sweep: its table, report-EXPERIMENT-lr_sweep.md and plot")
    sp.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                    help="only these of the experiment's models (families, e.g. gshard deepseekmoe)")
    sp.add_argument("--set", action="append", default=None, metavar="FIELD=VALUE",
                    help="override a model config field in every run, e.g. --set norm_topk_prob=false "
                    "(a control; give it its own --out)")
    sp.add_argument("--data-dir", default=None, help="data folder (default OUT/data)")
    sp.add_argument("--device", default="cpu", help="cpu or cuda (the whole experiment runs there)")
    sp.add_argument("--bf16", action="store_true",
                    help="bf16 autocast for every run (default: fp32, the same arithmetic for every model)")
    sp.add_argument("--sources", nargs="*", default=None)
    sp.add_argument("--text", action="append", default=None, metavar="PATH")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_reproduce)

    sp = sub.add_parser("export", help="a checkpoint of any layout -> the released layout",
                        description=cmd_export.__doc__)
    sp.add_argument("checkpoint", help="a run directory, its checkpoints/ folder, or a checkpoint")
    sp.add_argument("out", help="output directory: new or empty")
    sp.add_argument("--format", default="released", choices=["released", "qwen2_moe"],
                    help="released: the deepseek-moe-16b layout (default); qwen2_moe: transformers' "
                    "Qwen2-MoE, the same function, no remote code")
    sp.add_argument("--force", action="store_true",
                    help="replace OUT if it holds an earlier export (atomically)")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("quantize", help="a checkpoint with int8 or int4 weight-only linear layers",
                        description=cmd_quantize.__doc__)
    sp.add_argument("checkpoint", help="a run directory, its checkpoints/ folder, or a checkpoint")
    sp.add_argument("out", help="output directory: new or empty")
    sp.add_argument("--bits", type=int, required=True, choices=[8, 4])
    sp.add_argument("--group-size", type=int, default=128, help="inputs per int4 scale (default: 128)")
    sp.add_argument("--shard-size", default="2GB", help="largest output shard (default: 2GB)")
    sp.add_argument("--force", action="store_true", help="replace a checkpoint in OUT")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_quantize)

    sp = sub.add_parser("lm-eval", help="lm-evaluation-harness with this model type (optional extra)",
                        description=cmd_lm_eval.__doc__, add_help=False)
    sp.add_argument("args", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_lm_eval)

    sp = sub.add_parser("main", help="the main job: train the tiny DeepSeekMoE for a few minutes",
                        description="Train deepseekmoe-tiny on the default corpus for a few "
                        "minutes, report validation loss and write loss and expert-load plots.")
    _add_train_args(sp, shown_defaults={"out": "runs/main, or the next free runs/main-N"}, out=None, minutes=3.0)
    sp.set_defaults(func=cmd_main)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .runtime import configure_process

    configure_process()  # every command: freed memory kept, compiled kernels cached (runtime.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's (argparse cannot pass --options on)
        args = argparse.Namespace(func=cmd_lm_eval, args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FloatingPointError) as e:  # includes checkpoint and tokenizer errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # training saved a checkpoint first; the command resumes
        print(f"\ninterrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
