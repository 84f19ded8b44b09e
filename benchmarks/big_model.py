"""The released deepseek-moe-16b on this machine: bf16 as published, int8 and int4, one table.

For each checkpoint (``--bf16 DIR``, ``--int8 DIR``, ``--int4 DIR``; ``--convert DIR`` first
makes the int8 and int4 ones from the bf16 one with ``deepseek-moe quantize``, timing it), in a
fresh process each: the size on disk, the load time, a 512-token prefill and 64 greedy decoded
tokens (tokens/s, after one untimed prefill of another prompt has paged the weights in), and the
process's peak resident memory. Decode is also given as a fraction of
this machine's memory-bandwidth bound: the bytes of weights one token reads (every dense and
shared weight, k of the routed experts of each MoE layer, the output head, one embedding row)
divided by the bandwidth of reading a 2 GiB buffer. Use the full-size random checkpoint that
``scripts/random_checkpoint.py`` writes when the real weights are not at hand.

    python benchmarks/big_model.py --bf16 /work/big/deepseek-moe-16b-random --convert /work/big
    python benchmarks/big_model.py --int8 DIR --int4 DIR --json out.json
    python benchmarks/big_model.py --int8 DIR --int4 DIR --torch-kernels      # rows with torch's kernels too
    python benchmarks/big_model.py --int8 DIR --int4 DIR --kernel-ab 4 --new 16   # the kernels, A/B in one process

Peak resident memory counts the checkpoint pages a process touched: memory-mapped weights that
the kernel can drop again, besides what it allocated.

The peer: llama.cpp through llama-cpp-python, on the same weights converted to GGUF
(``benchmarks/gguf_convert.py``: Q8_0 with llama.cpp's converter, Q4_0 requantized from it),
same threads, the same prompt token ids, the same measurements (``--gguf-q8``, ``--gguf-q4``,
``--peer-python`` the interpreter that has llama_cpp). On a disk that cannot hold the GGUF files
and the int8 / int4 checkpoints at once, measure them in turns and join the tables with
``--also ROWS.json`` (the ``--json`` of an earlier invocation).

    python benchmarks/big_model.py --int8 DIR --int4 DIR --gguf-q8 q8.gguf --gguf-q4 q4.gguf \
        --peer-python VENV/bin/python --rounds 3

On a machine whose memory bandwidth drifts from minute to minute, ``--rounds N`` measures every
mode N times, with the bandwidth in each round and the peer first and last in turn; the table
gives medians, and the ratios to the peer are the median of the ratios within a round.

    python benchmarks/big_model.py --gguf-q8 q8.gguf --gguf-q4 q4.gguf --peer-python VENV/bin/python --json peer.json
    python benchmarks/big_model.py --bf16 DIR --int8 DIR --int4 DIR --also peer.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

GOAL_RSS_GIB = 20.0
GOAL_INT4_BOUND = 0.5


def prompts(prompt_len: int) -> tuple[list[int], list[int]]:
    """(warm-up prompt, timed prompt): token ids, the same for every engine."""
    import torch

    g = torch.Generator().manual_seed(0)
    warm, prompt = torch.randint(0, 100000, (2, prompt_len), generator=g).tolist()
    return warm, prompt


def peer_worker(path: str, prompt_len: int, new: int, threads: int, ids_file: str) -> dict:
    """llama.cpp on a GGUF file, measured as ``worker`` measures this project."""
    import llama_cpp

    warm, prompt = json.loads(Path(ids_file).read_text())
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=prompt_len + new + 32, n_batch=prompt_len, n_threads=threads,
                          n_threads_batch=threads, use_mmap=True, verbose=False)
    load_s = time.perf_counter() - t0
    llm.eval(warm)  # pages the weights in, as worker does
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0
    llm.reset()
    llm.eval(prompt[:16])
    stamps: list[float] = []
    t0 = time.perf_counter()
    for _ in range(new):
        tok = llm.sample(top_k=1, temp=0.0)
        stamps.append(time.perf_counter() - t0)
        llm.eval([tok])
    decode_s = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    return {"mode": f"llama.cpp {Path(path).stem.rsplit('-', 1)[-1].upper()}", "load_s": load_s,
            "prefill_tok_s": prompt_len / prefill_s, "decode_tok_s": 1 / decode_s,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def worker(path: str, prompt_len: int, new: int, threads: int) -> dict:
    import torch

    from deepseek_moe.checkpoint import load_pretrained
    from deepseek_moe.generate import generate
    from deepseek_moe.quant import QuantLinear

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load_pretrained(path)
    load_s = time.perf_counter() - t0
    cfg = model.config
    warm, prompt = (torch.tensor([ids]) for ids in prompts(prompt_len))
    with torch.inference_mode():
        model(warm)  # pages the weights in (those that fit): the timed runs see a warm cache
        t0 = time.perf_counter()
        model(prompt, routing_stats=False, logits_to_keep=1)  # as generation's prefill
        prefill_s = time.perf_counter() - t0
        stamps: list[float] = []
        t0 = time.perf_counter()
        generate(model, [prompt[0, :16].tolist()], new, greedy=True,
                 stream=lambda row, tok: stamps.append(time.perf_counter() - t0))
    decode_s = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)

    def nbytes(m: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])

    per_token = 0
    for name, m in model.named_modules():
        b = nbytes(m)
        if ".experts." in name or name.endswith(".experts"):  # routed experts (one module each, or stacked): k of E per token
            b = b * cfg.num_experts_per_tok / cfg.n_routed_experts
        elif name == "model.embed_tokens":
            b = b / cfg.vocab_size  # one row
        per_token += b
    quant = next((f"int{m.bits}" for m in model.modules() if isinstance(m, QuantLinear)), "bf16")
    return {"mode": quant, "load_s": load_s, "prefill_tok_s": prompt_len / prefill_s,
            "decode_tok_s": 1 / decode_s, "bytes_per_token": per_token,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def kernel_ab(path: str, new: int, threads: int, rounds: int) -> dict:
    """Decode tokens/s of one loaded quantized checkpoint with this package's kernel and with
    torch's (``quant.gemv_usable`` answering no), alternating ``rounds`` times in one process, so
    that both see the same machine: a fairer ratio than separate processes on a shared machine."""
    import torch

    from deepseek_moe import quant
    from deepseek_moe.checkpoint import load_pretrained
    from deepseek_moe.generate import generate

    torch.set_num_threads(threads)
    model = load_pretrained(path)
    warm, prompt = prompts(512)
    usable = quant.gemv_usable

    def rate(ours: bool) -> float:
        quant.gemv_usable = usable if ours else (lambda *a, **k: False)
        stamps: list[float] = []
        t0 = time.perf_counter()
        generate(model, [prompt[:32]], new + 1, greedy=True,
                 stream=lambda row, tok: stamps.append(time.perf_counter() - t0))
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    runs: dict[str, list[float]] = {"ours": [], "torch": []}
    with torch.inference_mode():
        model(torch.tensor([warm]))  # pages the weights in
        rate(True), rate(False)
        for _ in range(rounds):
            runs["ours"].append(rate(True))
            runs["torch"].append(rate(False))
    quant.gemv_usable = usable
    return {k: statistics.median(v) for k, v in runs.items()} | {"runs": runs}


def bandwidth_gbs(threads: int) -> float:
    """Read bandwidth: summing a 2 GiB buffer, best of 3."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(2**29, dtype=torch.float32)
    best = min(_timed(lambda: x.sum()) for _ in range(3))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def merged(rows: list[dict]) -> dict:
    """One mode's rows of several rounds as one: the median of each measured number, the
    largest peak RSS."""
    out = dict(rows[0])
    for k, v in rows[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [r[k] for r in rows]
            out[k] = max(vals) if k == "peak_rss_gib" else statistics.median(vals)
    return out


def run_child(args: list[str], python: str = sys.executable, env: Optional[dict] = None) -> dict:
    r = subprocess.run([python, __file__, *args], capture_output=True, text=True,
                       env=None if env is None else {**os.environ, **env})
    if r.returncode:
        raise SystemExit(f"{args}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def convert(src: str, out: str, bits: int) -> dict:
    """``deepseek-moe quantize`` in a process of its own: seconds and peak memory."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", (
        "import resource, sys; from deepseek_moe.quantize import quantize_checkpoint; "
        f"quantize_checkpoint({src!r}, {out!r}, {bits}, force=True, progress=False); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"quantize int{bits}: {r.stderr.strip().splitlines()[-1]}")
    return {"convert_s": time.perf_counter() - t0, "convert_rss_gib": int(r.stdout.split()[-1]) / 2**20}


def disk_gb(path: str) -> float:
    if Path(path).is_file():
        return Path(path).stat().st_size / 1e9
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bf16", help="a bf16 checkpoint, as published")
    p.add_argument("--int8")
    p.add_argument("--int4")
    p.add_argument("--convert", metavar="DIR", help="write the int8 / int4 checkpoints of --bf16 into DIR first")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--gguf-q8", help="the peer: a Q8_0 GGUF of the same weights")
    p.add_argument("--gguf-q4", help="the peer: a Q4_0 GGUF of the same weights")
    p.add_argument("--peer-python", default=sys.executable, help="a Python with llama_cpp (llama-cpp-python)")
    p.add_argument("--torch-kernels", action="store_true",
                   help="also measure int8 / int4 with torch's own kernels (DEEPSEEK_MOE_KERNELS=0) beside "
                        "this package's")
    p.add_argument("--kernel-ab", type=int, default=0, metavar="ROUNDS",
                   help="instead of the table: decode tokens/s of each quantized checkpoint with this "
                        "package's kernel and with torch's, alternating ROUNDS times in one process")
    p.add_argument("--also", action="append", default=[], metavar="ROWS.json",
                   help="rows measured by an earlier invocation (its --json), shown in the same table")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every mode this many times, alternating with the peer; medians and "
                        "the median of the ratios within a round")
    p.add_argument("--json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--peer-worker", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    p.add_argument("--bandwidth", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.prompt_len, args.new, args.threads)))
        return
    if args.peer_worker:
        print(json.dumps(peer_worker(args.peer_worker, args.prompt_len, args.new, args.threads, args.ids)))
        return
    if args.bandwidth:
        print(json.dumps({"gbs": bandwidth_gbs(args.threads)}))
        return
    if args.kernel_ab:
        for mode, path in (("int8", args.int8), ("int4", args.int4)):
            if path:
                r = kernel_ab(path, args.new, args.threads, args.kernel_ab)
                runs = "; ".join(f"{k} " + " ".join(f"{x:.2f}" for x in v) for k, v in r["runs"].items())
                print(f"{mode}: decode {r['ours']:.2f} tok/s with this package's kernel, {r['torch']:.2f} with "
                      f"torch's: {r['ours'] / r['torch']:.2f}x (medians of {args.kernel_ab}; {runs})")
        return
    modes = {"bf16": args.bf16, "int8": args.int8, "int4": args.int4}
    conversions: dict[str, dict] = {}
    if args.convert:
        if not args.bf16:
            p.error("--convert needs --bf16")
        name = Path(args.bf16).name
        for bits in (8, 4):
            out = str(Path(args.convert) / f"{name}-int{bits}")
            conversions[f"int{bits}"] = convert(args.bf16, out, bits)
            modes[f"int{bits}"] = out
    modes = {k: v for k, v in modes.items() if v}
    peers = {k: v for k, v in (("q8", args.gguf_q8), ("q4", args.gguf_q4)) if v}
    if not modes and not peers:
        p.error("give at least one checkpoint")
    ids_file = None
    if peers:
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(prompts(args.prompt_len), f)
        ids_file = f.name
    runs = [(mode, path, None) for mode, path in modes.items()]
    if args.torch_kernels:
        runs += [(f"{mode} (torch's kernels)", path, {"DEEPSEEK_MOE_KERNELS": "0"})
                 for mode, path in modes.items() if mode != "bf16"]

    def peer_rows() -> list[dict]:
        out = []
        for path in peers.values():
            r = run_child(["--peer-worker", path, "--ids", ids_file, "--prompt-len", str(args.prompt_len),
                           "--new", str(args.new), "--threads", str(args.threads)], python=args.peer_python)
            out.append(dict(r, disk_gb=disk_gb(path)))
        return out

    def our_rows(bw: float) -> list[dict]:
        out = []
        for mode, path, env in runs:
            r = run_child(["--worker", path, "--prompt-len", str(args.prompt_len), "--new", str(args.new),
                           "--threads", str(args.threads)], env=env)
            r.update(conversions.get(mode, {}), mode=mode, disk_gb=disk_gb(path),
                     bound_fraction=r["decode_tok_s"] * r["bytes_per_token"] / (bw * 1e9))
            out.append(r)
        return out

    # Rounds: the machine's bandwidth drifts between minutes, so each round measures it and runs
    # every mode once, the peer first in odd rounds and last in even ones; the ratios to the peer
    # are taken within a round (paired) and their median reported.
    rounds = []
    for i in range(args.rounds):
        bw = run_child(["--bandwidth", "--threads", str(args.threads)])["gbs"]
        rows_i = peer_rows() + our_rows(bw) if i % 2 == 0 else our_rows(bw) + peer_rows()
        rounds.append({"bandwidth_gbs": bw, "rows": rows_i})
        if args.rounds > 1:
            print(f"round {i + 1}/{args.rounds}: read {bw:.1f} GB/s; decode tok/s "
                  + ", ".join(f"{r['mode']} {r['decode_tok_s']:.2f}" for r in rows_i), flush=True)
    if ids_file:
        os.unlink(ids_file)
    bw = statistics.median(r["bandwidth_gbs"] for r in rounds)
    rows = [merged([next(r for r in rd["rows"] if r["mode"] == first["mode"]) for rd in rounds])
            for first in rounds[0]["rows"]]
    if args.json:  # this invocation's own rows (medians over the rounds) and each round's
        Path(args.json).write_text(json.dumps({"bandwidth_gbs": bw, "rows": rows, "rounds": rounds}, indent=1))
    for extra in args.also:
        rows += [dict(r, earlier=True) for r in json.loads(Path(extra).read_text())["rows"]]
    print(f"{args.threads} threads; read bandwidth {bw:.1f} GB/s; prompt {args.prompt_len}, {args.new} decoded"
          + (f"; medians of {args.rounds} rounds (peak RSS: the largest)" if args.rounds > 1 else "")
          + ("; * measured by an earlier invocation (--also)" if args.also else ""))
    head = ("mode", "disk GB", "convert s", "convert RSS GiB", "load s", "peak RSS GiB", "prefill tok/s",
            "decode tok/s", "GB/token", "of bound")
    print("  ".join(f"{h:>14}" for h in head))
    for r in rows:
        cells = (r["mode"] + ("*" if r.get("earlier") else ""), f"{r['disk_gb']:.2f}", f"{r['convert_s']:.0f}" if "convert_s" in r else "-",
                 f"{r['convert_rss_gib']:.1f}" if "convert_rss_gib" in r else "-", f"{r['load_s']:.1f}",
                 f"{r['peak_rss_gib']:.1f}", f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.2f}",
                 f"{r['bytes_per_token'] / 1e9:.2f}" if "bytes_per_token" in r else "-",
                 f"{r['bound_fraction']:.2f}" if "bound_fraction" in r else "-")
        print("  ".join(f"{c:>14}" for c in cells))
    by_mode = {r["mode"]: r for r in rows}
    for ours, theirs in (("int8", "llama.cpp Q8_0"), ("int4", "llama.cpp Q4_0")):
        if ours in by_mode and theirs in by_mode:
            a, b = by_mode[ours], by_mode[theirs]
            ratios = {}
            paired = a.get("earlier") == b.get("earlier") and not a.get("earlier")  # both from this invocation
            for key in ("decode_tok_s", "prefill_tok_s"):
                if not paired:  # one side from --also: the medians' ratio, not paired within rounds
                    ratios[key] = (a[key] / b[key], " (unpaired: one side from --also)")
                    continue
                per = [next(r for r in rd["rows"] if r["mode"] == ours)[key]
                       / next(r for r in rd["rows"] if r["mode"] == theirs)[key] for rd in rounds]
                ratios[key] = (statistics.median(per),
                               f" (rounds: {', '.join(f'{x:.2f}' for x in per)})" if len(per) > 1 else "")
            print(f"{ours} vs {theirs}: decode {ratios['decode_tok_s'][0]:.2f}x{ratios['decode_tok_s'][1]} (goal >= 1), "
                  f"prefill {ratios['prefill_tok_s'][0]:.2f}x{ratios['prefill_tok_s'][1]} (goal >= 2), "
                  f"peak RSS {a['peak_rss_gib']:.1f} / {b['peak_rss_gib']:.1f} GiB")
    for r in rows:
        if r["mode"].startswith("llama.cpp"):
            continue
        ok = r["peak_rss_gib"] <= GOAL_RSS_GIB
        print(f"{r['mode']}: peak RSS {r['peak_rss_gib']:.1f} GiB (goal <= {GOAL_RSS_GIB:.0f}: {'met' if ok else 'NOT met'})"
              + (f"; decode {r['bound_fraction']:.2f} of the bound (goal >= {GOAL_INT4_BOUND}: "
                 f"{'met' if r['bound_fraction'] >= GOAL_INT4_BOUND else 'NOT met'})" if r["mode"] == "int4" else ""))


if __name__ == "__main__":
    main()
