"""The paper's comparisons at small scale, with seeds, reuse, resume and a report with verdicts.

    deepseek-moe reproduce table1 --out runs/table1 [--seeds 3] [--quick] [--scale 2]

Every model of an experiment trains on the same data in the same order with the same recipe
(for a given seed: the data order and the initialisation are functions of the seed); each
model is trained once per seed. A finished run is reused when the command runs again, an
unfinished one resumes from its last checkpoint. Held-out loss is the test split's (all domains,
token-weighted), which no run has seen. Experiments given the same output folder share the runs
of the models they have in common (runs/FAMILY-seedN), and each writes report-NAME.md with its
plots NAME-*.png. Two commands may run into one folder at once: each run is claimed with a lock
file (``RunLock``), and a run that the other command holds is put off and waited for.

With ``lr_sweep`` (``--lr-sweep 0.5 1 2 4``: factors of the learning rate) every model first
trains with one seed (``sweep_seed``) and a shorter budget (``sweep_tokens``) at each rate, and
its best rate is the one of the lowest validation loss (the validation split; the test split
stays unseen). The experiment's runs are then made at the one recipe's rate (factor 1) and at
each model's best, and the report gives both tables with their verdicts and a loss-vs-rate plot.
A model whose best factor is 1 reuses its one-recipe runs (runs/FAMILY-seedN); other rates train
into runs/FAMILY-lrFx-seedN, the sweep into runs/FAMILY-lrFx-sweep.

Controls: ``--models`` keeps a subset of the experiment's models (and the claims between them),
``--set FIELD=VALUE`` changes a model config field in every run, ``--sweep-seed`` the sweep's
seed, and ``--sweep-only`` stops after the sweep (``report-NAME-lr_sweep.md``). A run folder
records its settings (``train_config.json``); a run recorded with other settings than the
command's is refused, never reused, so each control needs its own output folder.

A claim "A beats B" holds when A's mean held-out loss is lower by more than twice the standard
error of the difference over seeds, does not hold when it is higher by that much, and is
undecided otherwise (a single seed has no spread: undecided). A claim "A matches B" holds when
the difference is within that margin.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .train_config import TrainConfig

# ---- the experiments ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    a: str
    b: str
    kind: str  # "less": loss(a) < loss(b); "similar": loss(a) ~ loss(b)
    text: str


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    models: tuple[tuple[str, str], ...]  # (label, preset family) in the paper's order
    paper: dict[str, float]  # the paper's Pile loss per label (2B scale)
    claims: tuple[Claim, ...]
    analysis: bool = False  # fig4-fig5: run the expert analyses on the trained models


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment(
        "table1", "Table 1: DeepSeekMoE vs the MoE baselines and Dense (equal total and activated parameters)",
        (("Dense", "dense"), ("Hash Layer", "hash"), ("Switch", "switch"), ("GShard", "gshard"),
         ("DeepSeekMoE", "deepseekmoe")),
        {"Dense": 2.060, "Hash Layer": 1.932, "Switch": 1.881, "GShard": 1.867, "DeepSeekMoE": 1.808},
        (Claim("Hash Layer", "Dense", "less", "every MoE beats Dense: Hash Layer < Dense"),
         Claim("Switch", "Dense", "less", "every MoE beats Dense: Switch < Dense"),
         Claim("GShard", "Dense", "less", "every MoE beats Dense: GShard < Dense"),
         Claim("GShard", "Hash Layer", "less", "learned top-2 routing beats hashing: GShard < Hash Layer"),
         Claim("DeepSeekMoE", "GShard", "less", "DeepSeekMoE beats GShard"),
         Claim("DeepSeekMoE", "Switch", "less", "DeepSeekMoE beats Switch"))),
    Experiment(
        "fig3", "Fig. 3: shared-expert isolation, then finer expert segmentation",
        (("GShard (0+2/16)", "gshard"), ("+shared (1+1/15)", "moe-1+1of15"), ("1+3/31", "moe-1+3of31"),
         ("DeepSeekMoE (1+7/63)", "deepseekmoe")),
        {"GShard (0+2/16)": 1.867, "DeepSeekMoE (1+7/63)": 1.808},
        (Claim("+shared (1+1/15)", "GShard (0+2/16)", "less", "shared-expert isolation helps"),
         Claim("1+3/31", "+shared (1+1/15)", "less", "finer segmentation helps (16 -> 32 experts)"),
         Claim("DeepSeekMoE (1+7/63)", "1+3/31", "less", "finer segmentation helps (32 -> 64 experts)"))),
    Experiment(
        "shared-ratio", "Shared vs routed: 1, 2 or 4 shared experts of 64",
        (("1 shared + 7/63", "deepseekmoe"), ("2 shared + 6/62", "moe-2+6of62"), ("4 shared + 4/60", "moe-4+4of60")),
        {"1 shared + 7/63": 1.808, "2 shared + 6/62": 1.806, "4 shared + 4/60": 1.811},
        (Claim("2 shared + 6/62", "1 shared + 7/63", "similar", "1 and 2 shared experts are on par"),
         Claim("4 shared + 4/60", "1 shared + 7/63", "similar", "1 and 4 shared experts are on par"))),
    Experiment(
        "upper-bound", "Table 2: DeepSeekMoE near its upper bounds (GShard x1.5, Dense x16)",
        (("DeepSeekMoE", "deepseekmoe"), ("GShard x1.5", "gshard-x1.5"), ("Dense x16", "dense-x16")),
        {"DeepSeekMoE": 1.808, "GShard x1.5": 1.808, "Dense x16": 1.806},
        (Claim("DeepSeekMoE", "GShard x1.5", "similar", "DeepSeekMoE matches GShard x1.5"),
         Claim("DeepSeekMoE", "Dense x16", "similar", "DeepSeekMoE matches Dense x16"))),
    Experiment(
        "fig4-fig5", "Fig. 4 and 5: redundancy among routed experts; the shared expert",
        (("DeepSeekMoE", "deepseekmoe"), ("GShard x1.5", "gshard-x1.5")),
        {"DeepSeekMoE": 1.808, "GShard x1.5": 1.808},
        (), analysis=True),
)}


# ---- sizes ---------------------------------------------------------------------------------------------
@dataclass
class Settings(TrainConfig):
    """An experiment's settings: the training settings its runs share (``TrainConfig``'s fields,
    with the experiment's defaults below; each run sets its own preset, folder, seed and budget),
    and the experiment's own."""

    seeds: int = 3
    scale: int = 1  # multiplies hidden size and every FFN/expert width; tokens x scale^2
    eval_tokens: Optional[int] = 131072  # held-out tokens per domain for the final loss
    # model config overrides of every run (``--set``: a control, e.g. norm_topk_prob=false; tests:
    # smaller models). Recorded in each run's train_config.json; a folder holds one setting.
    extra_overrides: dict[str, Any] = field(default_factory=dict)
    models: tuple[str, ...] = ()  # a subset of the experiment's models, by family or label (empty: all)
    lr_sweep: tuple[float, ...] = ()  # factors of lr to sweep (empty: no sweep)
    sweep_only: bool = False  # stop after the sweep: its table, report and plot
    # per sweep run (default: half the tokens). The best rate depends on the horizon: DeepSeekMoE
    # is best at 4x the paper's rate after 1M tokens but at 1x after 2M (tiny presets, 16 x 256)
    sweep_tokens: Optional[int] = None
    sweep_seed: int = 0
    # TrainConfig's fields whose defaults differ for an experiment
    tokens: Optional[int] = 4_194_304  # per run: 1,024 steps of 16 x 256
    vocab_size: Optional[int] = 4096
    # Every run in fp32, or bf16 autocast for every run with ``bf16_autocast``. Not train's
    # per-model ``auto``: the models of one experiment must share their arithmetic to be compared.
    dtype: str = "float32"

    @classmethod
    def quick(cls, **kw: Any) -> "Settings":
        """Minutes, not hours: a smoke run (the verdicts will mostly be undecided)."""
        base = dict(seeds=2, tokens=16 * 64 * 40, seq_len=64, batch_size=16, eval_tokens=8192)
        base.update(kw)
        return cls(**base)

    def run_config(self, run: Path, family: str, seed: int, lr_factor: float = 1.0,
                   sweep: bool = False) -> TrainConfig:
        """The ``TrainConfig`` of one run: these settings, with the run's own preset, folder, seed,
        budget, learning rate (``lr`` x ``lr_factor``) and bookkeeping; ``sweep``: the sweep's
        budget."""
        tokens = (self.sweep_budget if sweep else self.tokens) * self.scale * self.scale
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}
        shared.update(
            preset=f"{family}-tiny", out=str(run), model_overrides=preset_overrides(family, self),
            data_dir=self.data_dir or str(run.parent.parent / "data"), tokens=tokens, steps=None,
            minutes=None, seed=seed, ckpt_every=max(50, tokens // (self.seq_len * self.batch_size) // 4),
            keep=1, eval_sequences=32, dtype=self.dtype_choice, bf16_autocast=False, lr=self.lr * lr_factor)
        return TrainConfig(**shared)

    @property
    def sweep_budget(self) -> int:
        return self.sweep_tokens if self.sweep_tokens is not None else max(1, self.tokens // 2)


def model_overrides(s: Settings) -> dict[str, Any]:
    """Overrides of the ``-tiny`` presets for these settings (the ratios of the architectures compared in section 4 hold)."""
    from .presets import get_config

    o: dict[str, Any] = {"vocab_size": s.vocab_size}
    if s.scale != 1:
        base = get_config("deepseekmoe-tiny")
        o["hidden_size"] = base.hidden_size * s.scale
        o["num_attention_heads"] = base.num_attention_heads * s.scale
        o["num_key_value_heads"] = base.num_key_value_heads * s.scale
    o.update(s.extra_overrides)
    return o


def preset_overrides(family: str, s: Settings) -> dict[str, Any]:
    from .presets import get_config

    o = model_overrides(s)
    if s.scale != 1:  # widths scale with the hidden size
        c = get_config(f"{family}-tiny")
        o["intermediate_size"] = c.intermediate_size * s.scale
        o["moe_intermediate_size"] = c.moe_intermediate_size * s.scale
    return o


# ---- runs ----------------------------------------------------------------------------------------------
def run_dir(out: Path, family: str, seed: int, lr_factor: float = 1.0, sweep: bool = False) -> Path:
    """runs/FAMILY-seedN at the one recipe's rate; runs/FAMILY-lrFx-seedN at another;
    runs/FAMILY-lrFx-sweep for a sweep run."""
    if sweep:
        return out / "runs" / f"{family}-lr{lr_factor:g}x-sweep"
    rate = "" if lr_factor == 1 else f"-lr{lr_factor:g}x"
    return out / "runs" / f"{family}{rate}-seed{seed}"


# The settings that decide a run's result: a run recorded with others is never reused for these.
# (Not: where it runs or writes, how often it checkpoints, whether it shows progress.)
_NOT_COMPARED = frozenset({"out", "data_dir", "device", "progress", "compile", "stop_after", "ckpt_every",
                           "keep", "eval_every", "minutes", "steps", "expert_parallel", "fsdp"})


def check_recorded_settings(run: Path, cfg: TrainConfig) -> None:
    """Raise ValueError when ``run`` holds a run (its ``train_config.json``) trained with other
    settings than ``cfg``: another ``--set``, rate, budget, data or seed in the same output folder
    must not be mixed into a comparison, nor resumed as if it were this one."""
    f = run / "train_config.json"
    if not f.is_file():
        return
    try:
        old = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{f} is unreadable ({e}); move the run away to train it again") from None
    new = json.loads(json.dumps(dataclasses.asdict(cfg)))
    diff = sorted(k for k in new if k in old and k not in _NOT_COMPARED and old[k] != new[k])
    if diff:
        shown = "; ".join(f"{k}: {old[k]!r} there, {new[k]!r} now" for k in diff)
        raise ValueError(f"{run} was trained with other settings ({shown}); use another --out "
                         "for these settings")


def _finished(run: Path) -> Optional[dict[str, Any]]:
    f = run / "result.json"
    if f.is_file():
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError:
            return None
    return None


class RunLock:
    """An exclusive claim on one run directory, so that several ``reproduce`` commands sharing an
    output folder (say table1 and fig3, which share the GShard and DeepSeekMoE runs) never train
    the same run at once. The lock file holds the owner's host and pid; a lock left by a process
    that no longer exists on this host is taken over."""

    def __init__(self, run: Path):
        self.path = run / ".lock"
        self.held = False

    def _stale(self) -> bool:
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return False  # being written right now, or gone: not ours to judge
        if host != socket.gethostname():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            pass  # alive under another user, or not a pid: not stale
        return False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                return False
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}\n")
            self.held = True
            return True
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def train_one(out: Path, family: str, seed: int, s: Settings, lr_factor: float = 1.0,
              sweep: bool = False) -> Optional[dict[str, Any]]:
    """Train (or reuse, or resume) one model with one seed at ``lr_factor`` x the rate, then score
    it on the test split (a ``sweep`` run: its shorter budget, scored on the validation split).
    Returns None when another process is training this run right now (see ``RunLock``)."""
    run = run_dir(out, family, seed, lr_factor, sweep)
    check_recorded_settings(run, s.run_config(run, family, seed, lr_factor, sweep))
    done = _finished(run)
    if done is not None:
        return done
    lock = RunLock(run)
    if not lock.acquire():
        return None
    try:
        done = _finished(run)  # finished between the first look and the lock
        return done if done is not None else _train_and_score(run, family, seed, s, lr_factor, sweep)
    finally:
        lock.release()


def _train_and_score(run: Path, family: str, seed: int, s: Settings, lr_factor: float = 1.0,
                     sweep: bool = False) -> dict[str, Any]:
    import torch

    from .evaluate import eval_cache, evaluate_splits
    from .runs import load_checkpoint
    from .runtime import machine
    from .train import train

    cfg = s.run_config(run, family, seed, lr_factor, sweep)
    tokens = cfg.tokens
    # The run folder is this command's own: resume its newest whole checkpoint, else start it over.
    res = train(cfg, resume=True, force=True)
    if res.interrupted:
        raise KeyboardInterrupt(f"{run} was interrupted; run the command again to resume")
    model, _, ckpt, run_d = load_checkpoint(run, device=s.device)
    cache = eval_cache(ckpt, run_d, progress=False)
    if cache.num_tokens("train") < tokens:
        raise ValueError(f"{tokens:,} tokens per run but the training split holds "
                         f"{cache.num_tokens('train'):,}: runs must see unique tokens only")
    split = "validation" if sweep else "test"
    report = evaluate_splits(model, cache, (split,), seq_len=s.seq_len, max_tokens=s.eval_tokens,
                             progress=False, checkpoint=str(ckpt))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    scores = report.splits[split]
    result = {"family": family, "seed": seed, f"{'val' if sweep else 'test'}_loss": scores["all"].loss,
              split if sweep else "test": {d: sc.loss for d, sc in scores.items()},
              "lr": cfg.lr, "lr_factor": lr_factor, "tokens": res.tokens, "steps": res.step,
              "curve": [(r["tokens"], r["lm_loss"]) for r in rows if "lm_loss" in r],
              "machine": machine(torch.device(s.device))}
    from .atomic import write_json_atomic

    write_json_atomic(run / "result.json", result)
    return result


# ---- verdicts ------------------------------------------------------------------------------------------
def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def verdict(a: Sequence[float], b: Sequence[float], kind: str) -> tuple[str, str]:
    """(verdict, why) for a claim on two models' per-seed losses; see the module docstring."""
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    diff = ma - mb
    if len(a) < 2 or len(b) < 2:
        return "undecided", f"difference {diff:+.4f}, one seed: no spread to judge it by"
    margin = 2 * math.sqrt(sa * sa / len(a) + sb * sb / len(b))
    why = f"difference {diff:+.4f}, 2 x standard error {margin:.4f}"
    if kind == "less":
        if diff < -margin:
            return "holds", why
        if diff > margin:
            return "does not hold", why
        return "undecided", why + " (within the seed spread)"
    if kind == "similar":
        return ("holds", why) if abs(diff) <= margin else ("does not hold", why)
    raise ValueError(f"unknown claim kind {kind!r}")


# ---- the experiment ------------------------------------------------------------------------------------
def reproduce(name: str, out: Path, s: Settings, poll_s: float = 30.0) -> Path:
    """Run ``name`` (see ``EXPERIMENTS``) into ``out``; returns the report's path."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    if s.seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {s.seeds}")
    if any(f <= 0 for f in s.lr_sweep):
        raise ValueError(f"learning-rate factors must be positive, got {list(s.lr_sweep)}")
    if s.sweep_only and not s.lr_sweep:
        raise ValueError("--sweep-only needs --lr-sweep")
    exp = select_models(EXPERIMENTS[name], s.models)
    out.mkdir(parents=True, exist_ok=True)
    sweep: dict[str, dict[float, float]] = {}
    best: dict[str, float] = {}
    if s.lr_sweep:
        jobs = [(label, family, s.sweep_seed, f, True) for label, family in exp.models for f in s.lr_sweep]
        swept = _run_jobs(out, jobs, s, poll_s, "sweep")
        for label, family in exp.models:
            sweep[label] = {f: swept[(label, s.sweep_seed, f, True)]["val_loss"] for f in s.lr_sweep}
            best[label] = best_factor(sweep[label])
        # The chosen rates, before the long runs at them: printed, and the plot drawn now.
        from .plots import plot_lr_sweep

        table = sweep_table(exp, sweep, best, s)
        print("\n".join(table), flush=True)
        png = plot_lr_sweep(exp, sweep, best, s.lr, out, _warmup_words(s, sweep_only=True))
        print(f"loss vs rate: {png}", flush=True)
        if s.sweep_only:
            path = out / f"report-{name}-lr_sweep.md"
            from .atomic import write_text_atomic

            write_text_atomic(path, "\n".join([f"# {exp.title}", "", _settings_line(s, sweep_only=True), "",
                                               _where_line(swept.values()), ""] + table
                                              + ["", f"![{png.stem}]({png.name})"]) + "\n")
            return path
    # seed-major: a partial experiment already compares every model.
    factors = {label: sorted({1.0, best.get(label, 1.0)}) for label, _ in exp.models}
    jobs = [(label, family, seed, f, False) for seed in range(s.seeds) for label, family in exp.models
            for f in factors[label]]
    done = _run_jobs(out, jobs, s, poll_s)
    results = {label: [done[(label, seed, 1.0, False)] for seed in range(s.seeds)] for label, _ in exp.models}
    tuned = ({label: [done[(label, seed, best[label], False)] for seed in range(s.seeds)] for label, _ in exp.models}
             if s.lr_sweep else None)
    analyses = _analyses(exp, out, s) if exp.analysis else {}
    text = report(exp, results, analyses, s, out, tuned=tuned, sweep=sweep, best=best)
    path = out / f"report-{name}.md"
    from .atomic import write_text_atomic

    write_text_atomic(path, text)  # another command sharing OUT may write it too
    print(text)
    return path


def select_models(exp: Experiment, names: Sequence[str]) -> Experiment:
    """``exp`` with only the models named (by family, e.g. ``gshard``, or label), its claims those
    between two kept models; all of them when ``names`` is empty."""
    if not names:
        return exp
    known = {n.lower(): label for label, family in exp.models for n in (label, family)}
    unknown = [n for n in names if n.lower() not in known]
    if unknown:
        raise ValueError(f"{exp.name} has no model {', '.join(map(repr, unknown))}; its models: "
                         + ", ".join(f"{family} ({label})" for label, family in exp.models))
    keep = {known[n.lower()] for n in names}
    models = tuple(m for m in exp.models if m[0] in keep)
    return dataclasses.replace(
        exp, models=models, title=f"{exp.title}; only {', '.join(label for label, _ in models)}",
        paper={k: v for k, v in exp.paper.items() if k in keep},
        claims=tuple(c for c in exp.claims if c.a in keep and c.b in keep))


def best_factor(losses: dict[float, float]) -> float:
    """The rate factor of the lowest validation loss (the smaller factor on a tie)."""
    return min(sorted(losses), key=lambda f: losses[f])


def _run_jobs(out: Path, jobs: list[tuple[str, str, int, float, bool]], s: Settings, poll_s: float,
              what: str = "") -> dict[tuple[str, int, float, bool], dict[str, Any]]:
    """Train (or reuse) every (label, family, seed, lr factor, sweep) job, in order. A run that
    another process is training (a second experiment sharing OUT) is put off and waited for at
    the end."""
    todo = list(enumerate(jobs))
    n = len(todo)
    done: dict[tuple[str, int, float, bool], dict[str, Any]] = {}
    waiting = False
    while todo:
        later = []
        for i, (label, family, seed, f, sw) in todo:
            if not waiting:
                rate = "" if f == 1 and not s.lr_sweep else f", lr {s.lr * f:.3g} ({f:g}x)"
                print(f"[{what + ' ' if what else ''}{i + 1}/{n}] {label} ({family}-tiny), seed {seed}{rate}",
                      flush=True)
            r = train_one(out, family, seed, s, f, sw)
            if r is None:
                if not waiting:
                    print(f"  {run_dir(out, family, seed, f, sw)} is being trained by another process; later",
                          flush=True)
                later.append((i, (label, family, seed, f, sw)))
            else:
                done[(label, seed, f, sw)] = r
        if later and len(later) == len(todo):
            if not waiting:
                print(f"waiting for {len(later)} run(s) that another process is training", flush=True)
            waiting = True
            time.sleep(poll_s)
        else:
            waiting = False
        todo = later
    return done


def _analyses(exp: Experiment, out: Path, s: Settings) -> dict[str, list[dict[str, Any]]]:
    from .analyze import analyze
    from .atomic import write_json_atomic
    from .evaluate import eval_cache
    from .runs import load_checkpoint

    res: dict[str, list[dict[str, Any]]] = {}
    for label, family in exp.models:
        for seed in range(s.seeds):
            run = run_dir(out, family, seed)
            f = run / "analysis.json"
            if not f.is_file():
                model, _, ckpt, run_d = load_checkpoint(run, device=s.device)
                cache = eval_cache(ckpt, run_d, progress=False)
                a = analyze(model, cache, analyses=("disable_top", "top_k", "shared"), split="test",
                            seq_len=s.seq_len, max_tokens=s.eval_tokens or 32768, progress=False)
                write_json_atomic(f, a.to_dict())
            res.setdefault(label, []).append(json.loads(f.read_text()))
    return res


def _results_table(exp: Experiment, results: dict[str, list[dict[str, Any]]], s: Settings,
                   with_lr: bool = False) -> list[str]:
    """The per-model table and the claims' verdicts for one set of runs."""
    from .params import count_parameters, human
    from .presets import get_config

    lr_col = ("| lr ", "---|") if with_lr else ("", "")
    lines = [f"| model | preset {lr_col[0]}| total | activated | test loss (mean +- std) | per seed | paper (2B, Pile) |",
             f"|---|---|{lr_col[1]}---|---|---|---|---|"]
    for label, family in exp.models:
        rs = results[label]
        cfg = get_config(f"{family}-tiny", **preset_overrides(family, s))
        p = count_parameters(cfg)
        m, sd = mean_std([r["test_loss"] for r in rs])
        paper = exp.paper.get(label)
        seeds = ", ".join(f"{r['test_loss']:.4f}" for r in rs)
        paper_s = "-" if paper is None else f"{paper:.3f}"
        spread = "(1 seed)" if math.isnan(sd) else f"+- {sd:.4f}"
        lr = f"| {rs[0].get('lr', s.lr):.3g} " if with_lr else ""
        lines.append(f"| {label} | {family}-tiny {lr}| {human(p.total)} | {human(p.active)} | {m:.4f} {spread} "
                     f"| {seeds} | {paper_s} |")
    if exp.claims:
        lines += ["", "| claim | verdict | evidence |", "|---|---|---|"]
        for c in exp.claims:
            v, why = verdict([r["test_loss"] for r in results[c.a]], [r["test_loss"] for r in results[c.b]], c.kind)
            lines.append(f"| {c.text} | **{v}** | {why} |")
    return lines


def report(exp: Experiment, results: dict[str, list[dict[str, Any]]], analyses: dict[str, list[dict[str, Any]]],
           s: Settings, out: Path, tuned: Optional[dict[str, list[dict[str, Any]]]] = None,
           sweep: Optional[dict[str, dict[float, float]]] = None, best: Optional[dict[str, float]] = None) -> str:
    """The markdown report (and its PNGs in ``out``); with a learning-rate sweep, the runs at each
    model's best rate (``tuned``), the sweep's validation losses and the chosen factors too."""
    from .plots import plot_experiment, plot_lr_sweep

    lines = [f"# {exp.title}", "", _settings_line(s), ""]
    runs = [r for group in (results, tuned or {}) for rs in group.values() for r in rs]
    lines += [_where_line(runs), ""]
    if tuned is None:
        table = _results_table(exp, results, s)
        if exp.claims:  # the claims under their heading, as before the sweep existed
            k = table.index("| claim | verdict | evidence |")
            table[k - 1:k - 1] = ["", "## The paper's claims"]
        lines += table
    else:
        lines += [f"## One recipe: every model at lr {s.lr:g}", ""] + _results_table(exp, results, s)
        lines += ["", "## Each model at its best rate (chosen by the sweep's validation loss)", ""]
        lines += _results_table(exp, tuned, s, with_lr=True)
        lines += [""] + sweep_table(exp, sweep, best, s)
    if analyses:
        lines += _analysis_section(analyses)
    plots = plot_experiment(exp, results, analyses, out)
    if sweep:
        plots.append(plot_lr_sweep(exp, sweep, best, s.lr, out, _warmup_words(s, sweep_only=True)))
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _settings_line(s: Settings, sweep_only: bool = False) -> str:
    if sweep_only:
        head = (f"Learning-rate sweep only: seed {s.sweep_seed}; {s.sweep_budget * s.scale ** 2:,} training "
                "tokens per run")
    else:
        head = f"{s.seeds} seed(s); {s.tokens * s.scale ** 2:,} training tokens per run"
    line = (f"{head} (unique: the runs never repeat data); seq {s.seq_len} x batch {s.batch_size}; peak lr "
            f"{s.lr}; {_warmup_words(s, sweep_only)}; vocab {s.vocab_size}; width x{s.scale}. Loss: "
            f"{'validation' if sweep_only else 'test'} split, all domains (nats/token).")
    if s.extra_overrides:
        line += " Every model with " + ", ".join(f"{k}={json.dumps(v)}" for k, v in s.extra_overrides.items()) + "."
    return line


def _warmup_words(s: Settings, sweep_only: bool = False) -> str:
    """The warmup of the report's runs: it decides how high a rate a short run can take."""
    from .train import default_warmup

    if s.warmup_steps is not None:
        return f"warmup {s.warmup_steps} steps"
    steps = {name: tokens * s.scale ** 2 // (s.seq_len * s.batch_size) for name, tokens in
             (("sweep", s.sweep_budget), ("full runs", s.tokens))
             if name == "sweep" and (s.lr_sweep or sweep_only) or name != "sweep" and not sweep_only}
    if len(steps) == 1:
        return f"warmup 10% of each run ({default_warmup(next(iter(steps.values())))} steps)"
    return "warmup 10% of each run (" + ", ".join(f"{default_warmup(n)} steps in the {name}"
                                                 for name, n in steps.items()) + ")"


def _where_line(runs: Any) -> str:
    where = collections.Counter(_where(r) for r in runs)
    return "Computed on " + "; ".join(f"{w} ({n} run{'s' * (n > 1)})" for w, n in where.most_common()) + "."


def _where(result: dict[str, Any]) -> str:
    m = result.get("machine")
    return f"{m['device']}, torch {m['torch']}, {m['threads']} threads" if m else "an unrecorded machine"


def sweep_table(exp: Experiment, sweep: dict[str, dict[float, float]], best: dict[str, float],
                s: Settings) -> list[str]:
    """The learning-rate sweep's validation losses per model and factor, the best in bold."""
    factors = sorted({f for v in sweep.values() for f in v})
    lines = [f"## Learning-rate sweep: validation loss, seed {s.sweep_seed}, "
             f"{s.sweep_budget * s.scale ** 2:,} tokens per run (best in bold)", "",
             "| model | " + " | ".join(f"{f:g}x = {s.lr * f:.3g}" for f in factors) + " | best |",
             "|---|" + "---|" * (len(factors) + 1)]
    for label, _ in exp.models:
        cells = [(f"**{sweep[label][f]:.4f}**" if f == best[label] else f"{sweep[label][f]:.4f}")
                 for f in factors]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {best[label]:g}x |")
    edge = [f"{label} ({best[label]:g}x)" for label, _ in exp.models
            if len(factors) > 1 and best[label] in (factors[0], factors[-1])]
    if edge:
        lines += ["", "At the edge of the sweep, so the best rate may lie beyond it: " + ", ".join(edge)
                  + ". A wider sweep (`--lr-sweep` with more factors, into the same folder) reuses these runs."]
    return lines


def _analysis_section(analyses: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["", "## Disabling top routed experts (Fig. 4)", "",
             "| model | " + " | ".join(f"r = {round(r['ratio'] * 16)}/16" for r in
                                      next(iter(analyses.values()))[0]["disable_top"]) + " |",
             "|---|" + "---|" * len(next(iter(analyses.values()))[0]["disable_top"])]
    rises: dict[str, list[float]] = {}
    for label, runs in analyses.items():
        cols = list(zip(*[[r["loss"] for r in a["disable_top"]] for a in runs]))
        lines.append(f"| {label} | " + " | ".join(f"{statistics.fmean(c):.4f}" for c in cols) + " |")
        rises[label] = [a["disable_top"][-1]["loss"] - a["disable_top"][0]["loss"] for a in runs]
    labels = list(analyses)
    if len(labels) == 2:
        v, why = verdict([-x for x in rises[labels[0]]], [-x for x in rises[labels[1]]], "less")
        lines += ["", f"Claim: {labels[0]}'s loss rises more than {labels[1]}'s when the top 4/16 routed "
                      f"experts are disabled (less redundancy): **{v}** ({why.replace('difference', 'rise difference')})"]
    lines += ["", "## Activated routed experts (Fig. 5) and the shared expert", ""]
    for label, runs in analyses.items():
        sweep = {}
        for a in runs:
            for r in a["top_k_sweep"]:
                sweep.setdefault(r["k"], []).append(r["loss"])
        lines.append(f"- {label} (trained k = {runs[0]['top_k']}): " + ", ".join(
            f"k={k}: {statistics.fmean(v):.4f}" for k, v in sorted(sweep.items())))
        shared = [a["shared"] for a in runs if a.get("shared")]
        if shared:
            lines.append(f"  - shared expert off, k + 1 routed: {statistics.fmean(x['with_shared'] for x in shared):.4f} "
                         f"-> {statistics.fmean(x['without_shared'] for x in shared):.4f} (paper: 1.808 -> 2.414)")
    return lines
