"""Every PNG the package draws (matplotlib, no display): a training run's loss curve and expert
load, the expert-specialisation analyses of ``analyze`` and the comparisons of ``reproduce``.

The results come in as data; this module imports neither ``analyze`` nor ``reproduce``.
"""

from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .config import DeepseekMoEConfig


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average: each value weighs ``alpha``, the running mean ``1 - alpha``."""
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def centred_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the ``window`` values centred on each one (fewer at the ends): smooth, and unlike a
    trailing average it does not lag behind a curve that falls fast."""
    half = window // 2
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half): i + half + 1]
        out.append(sum(part) / len(part))
    return out


def plot_loss_curve(metrics: list[dict[str, Any]], path: Path, title: str = "",
                    ylabel: str = "next-token loss (nats)") -> Optional[Path]:
    """Training LM loss (raw and smoothed) and validation loss against tokens seen."""
    steps = [r for r in metrics if "lm_loss" in r]
    if not steps:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = [r["tokens"] / 1e6 for r in steps]
    y = [r["lm_loss"] for r in steps]
    ax.plot(x, y, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
    w = max(1, len(y) // 40) * 2 + 1  # about 5% of the run, centred: no lag on a falling curve
    ax.plot(x, centred_mean(y, w), color="tab:blue", lw=1.8, label=f"train (mean of {w} steps)")
    val = [r for r in metrics if r.get("val_loss") is not None]
    if val:
        ax.plot([r["tokens"] / 1e6 for r in val], [r["val_loss"] for r in val], "o-",
                color="tab:red", label="validation")
        last = val[-1]
        ax.annotate(f"{last['val_loss']:.3f}", (last["tokens"] / 1e6, last["val_loss"]),
                    textcoords="offset points", xytext=(5, 8), color="tab:red")
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "training loss")
    lo = min(y + [r["val_loss"] for r in val])
    ax.set_ylim(lo - 0.1, min(max(y), lo + 4))
    return _finish(plt, fig, ax, path)


def plot_expert_load(
    metrics: list[dict[str, Any]], config: DeepseekMoEConfig, path: Path, tail: float = 0.2
) -> Optional[Path]:
    """Left: tokens per expert / mean over the last ``tail`` of steps (1 = balanced), per MoE
    layer. Right: the load's coefficient of variation per layer over training."""
    rows = [r for r in metrics if r.get("tokens_per_expert")]
    if not rows:
        return None
    plt = pyplot()
    last = rows[int(len(rows) * (1 - tail)):] or rows[-1:]
    load = np.sum([r["tokens_per_expert"] for r in last], axis=0).astype(float)  # [L, E]
    rel = load / load.mean(axis=1, keepdims=True)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    from matplotlib.colors import TwoSlopeNorm

    # White = exactly balanced; blue = under-used (0 = idle), red = over-used.
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(rel.max())))
    im = ax.imshow(rel, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    ax.set_yticks(range(len(config.moe_layers)), [f"layer {i}" for i in config.moe_layers])
    ax.set_xlabel("routed expert")
    ax.set_title(f"expert load / mean, last {len(last)} steps ({config.name or 'model'})")
    fig.colorbar(im, ax=ax, label="tokens / mean tokens")
    x = [r["tokens"] / 1e6 for r in rows]
    cv = np.array([r["load_cv"] for r in rows])
    for j, layer in enumerate(config.moe_layers):
        ax2.plot(x, ema(cv[:, j].tolist()), label=f"layer {layer}")
    ax2.set_xlabel("tokens (millions)")
    ax2.set_ylabel("coefficient of variation of expert load")
    ax2.set_title("load balance over training (EMA)")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- analyze and reproduce ----------------------------------------------------------------------------
def plot_analysis(res: Any, out_dir: Path) -> list[Path]:
    """One PNG per analysis that ran; returns their paths. ``res``: an ``analyze.Analysis``."""
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    title = f"{res.model} ({res.n_shared} shared + {res.top_k}/{res.n_routed} routed)"

    def save(fig, name: str) -> None:
        p = out_dir / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    def finish_line(fig, ax, xlabel: str, what: str, name: str) -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out loss (nats)")
        ax.set_title(f"{what}\n{title}", fontsize=10)
        ax.grid(alpha=0.3)
        save(fig, name)

    if res.disable_top:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        x = [r["ratio"] for r in res.disable_top]
        y = [r["loss"] for r in res.disable_top]
        ax.plot(x, y, "o-", color="tab:red")
        for r in res.disable_top:
            ax.annotate(f"{r['disabled']}", (r["ratio"], r["loss"]), textcoords="offset points",
                        xytext=(0, 7), ha="center", fontsize=8, color="gray")
        ax.margins(y=0.15)
        ax.set_xticks(x, [f"{round(v * 16)}/16" if v else "0" for v in x])
        finish_line(fig, ax, "ratio of disabled top routed experts (gray: experts masked)",
                    "disable top routed experts (Fig. 4)", "disable_top_experts.png")
    if res.top_k_sweep:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        x = [r["k"] for r in res.top_k_sweep]
        y = [r["loss"] for r in res.top_k_sweep]
        ax.plot(x, y, "o-", color="tab:blue")
        if res.top_k in x:
            ax.plot([res.top_k], [y[x.index(res.top_k)]], "*", ms=15, color="tab:orange",
                    label=f"trained k = {res.top_k}")
            ax.legend()
        ax.set_xticks(x)
        finish_line(fig, ax, "activated routed experts per token at evaluation",
                    "varying activated routed experts (Fig. 5)", "activated_experts.png")
    if res.shared:
        s = res.shared
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        labels = [f"shared on\nk = {res.top_k}", f"shared off\nk = {s['k_without']}"]
        vals = [s["with_shared"], s["without_shared"]]
        bars = ax.bar(labels, vals, color=["tab:green", "tab:gray"])
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), textcoords="offset points",
                        xytext=(0, 3), ha="center")
        ax.set_ylabel("held-out loss (nats)")
        ax.set_ylim(0, max(vals) * 1.15)
        ax.set_title(f"disabling the shared expert\n{title}", fontsize=10)
        save(fig, "shared_expert.png")
    if res.load:
        ld = res.load
        share = np.asarray(ld["domain_share"])  # [D, L, E]
        D, L, E = share.shape
        from matplotlib.colors import TwoSlopeNorm

        fig, axes = plt.subplots(L, 1, figsize=(max(8, E * 0.16 + 3), 1.0 + L * (0.35 * D + 0.9)),
                                 squeeze=False)
        rel = share * E  # 1 = the uniform share
        norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(rel.max())))
        for i in range(L):
            ax = axes[i, 0]
            im = ax.imshow(rel[:, i, :], aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
            ax.set_yticks(range(D), ld["domains"], fontsize=8)
            ax.set_title(f"layer {ld['layers'][i]}: share of each domain's tokens per expert x E "
                         f"(JS {ld['domain_js'][i]:.3f} bits)", fontsize=9)
            fig.colorbar(im, ax=ax, pad=0.01, label="x uniform")
        axes[-1, 0].set_xlabel("routed expert")
        save(fig, "expert_load_by_domain.png")

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(10, 0.55 * len(ld["layers"])), 3.8))
        layers = [str(x) for x in ld["layers"]]
        a1.bar(layers, ld["load_cv"], color="tab:purple")
        a1.set_xlabel("MoE layer")
        a1.set_ylabel("coefficient of variation of expert load")
        a1.set_title("load balance (0 = perfectly balanced)", fontsize=10)
        rel_ent = [e / math.log(res.n_routed) for e in ld["entropy"]]
        bars = a2.bar(layers, rel_ent, color="tab:cyan")
        _value_labels(a2, [b.get_x() + b.get_width() / 2 for b in bars], rel_ent, [f"{v:.3f}" for v in rel_ent],
                      fontsize=8)
        a2.set_ylim(0, 1.1 if len(layers) <= _UPRIGHT_AFTER else 1.25)
        a2.set_xlabel("MoE layer")
        a2.set_ylabel("routing entropy / ln E")
        a2.set_title("routing entropy (1 = uniform scores)", fontsize=10)
        fig.suptitle(title, fontsize=10)
        save(fig, "routing_stats.png")
    if res.paths:
        pa = res.paths
        fig, ax = plt.subplots(figsize=(max(9, 0.45 * len(pa["layers"])), 4.2))
        x = np.arange(len(pa["layers"]))
        w = 0.38
        if res.n_shared:
            ax.bar(x - w / 2, pa["shared_rms"], w, color="tab:green", label="shared experts' output")
        ax.bar(x + (w / 2 if res.n_shared else 0), pa["routed_rms"], w, color="tab:blue",
               label="gated routed experts' output")
        ax.plot(x, pa["residual_rms"], "k_", ms=28, mew=2, label="residual stream (input)")
        _value_labels(ax, x + (w / 2 if res.n_shared else 0), pa["routed_rms"],
                      [f"gates {g:.2f}" for g in pa["gate_sum"]], fontsize=7, color="tab:blue")
        ax.set_yscale("log")
        ax.set_xticks(x, [str(v) for v in pa["layers"]])
        ax.set_xlabel("MoE layer (annotated: mean sum of a token's top-k gates)")
        ax.set_ylabel("root mean square over tokens")
        ax.set_title(f"what each MoE layer adds to the residual stream\n{title}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        save(fig, "moe_paths.png")
    res.plots = [str(p) for p in paths]
    return paths


_UPRIGHT_AFTER = 12  # bars per axes beyond which their value labels stand upright


def _value_labels(ax, xs, ys, texts: list[str], **style) -> None:
    """Each text just above its bar's top (x, y); upright where there are more than
    ``_UPRIGHT_AFTER`` bars (the 16B's 27 MoE layers: side by side they run into each other)."""
    upright = len(texts) > _UPRIGHT_AFTER
    for x, y, t in zip(xs, ys, texts):
        ax.annotate(t, (x, y), textcoords="offset points", xytext=(0, 3), ha="center", va="bottom",
                    rotation=90 if upright else 0, **style)


def _wrapped(title: str, width: int = 90) -> str:
    """A long title on as many lines as it needs (one line is cut at the figure's edges)."""
    return "\n".join(textwrap.wrap(title, width))


def _finish(plt: Any, fig: Any, ax: Any, path: Path) -> Path:
    """Grid, legend, layout; save ``fig`` to ``path`` and close it."""
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lr_sweep(exp: Any, sweep: dict[str, dict[float, float]], best: dict[str, float], lr: float,
                  out: Path, recipe: str = "") -> Path:
    """Validation loss against the learning rate, one line per model, its chosen rate ringed;
    ``recipe`` (say the sweep's warmup, which decides how high a rate a short run can take)
    goes into the title."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, _ in exp.models:
        fs = sorted(sweep[label])
        line, = ax.plot([lr * f for f in fs], [sweep[label][f] for f in fs], "o-", label=label)
        ax.plot([lr * best[label]], [sweep[label][best[label]]], "o", ms=13, mfc="none", color=line.get_color())
    ax.axvline(lr, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    factors = sorted({f for v in sweep.values() for f in v})
    ax.set_xticks([lr * f for f in factors], [f"{f:g}x\n{lr * f:.3g}" for f in factors])
    ax.minorticks_off()
    # no offset notation, and at least 0.05 nats of range: a flat curve must look flat
    ax.ticklabel_format(axis="y", useOffset=False)
    lo, hi = ax.get_ylim()
    if hi - lo < 0.05:
        mid = (hi + lo) / 2
        ax.set_ylim(mid - 0.025, mid + 0.025)
    ax.set_xlabel(f"peak learning rate (dotted: the paper's {lr:g})")
    ax.set_ylabel("validation loss after the sweep's budget")
    ax.set_title(_wrapped(f"{exp.title}: learning-rate sweep" + (f" ({recipe})" if recipe else "")), fontsize=9)
    return _finish(plt, fig, ax, out / f"{exp.name}-lr_sweep.png")


def plot_experiment(exp: Any, results: dict[str, list[dict[str, Any]]],
                    analyses: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    """The PNGs of a ``reproduce`` report in ``out`` (``exp``: a ``reproduce.Experiment``): the training-loss curves (mean over seeds),
    the test loss of each model (mean, standard deviation, one dot per seed) and, with
    ``analyses``, the loss increase when the top routed experts are disabled (Fig. 4)."""
    plt = pyplot()
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    top = []  # the curves a quarter of the way in: the y range shows the end, where models differ
    for label, _ in exp.models:
        curves = [r["curve"] for r in results[label] if r["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        x = [t / 1e6 for t, _ in curves[0][:n]]
        y = ema([statistics.fmean(c[i][1] for c in curves) for i in range(n)],
                 min(1.0, max(0.02, 10 / max(n, 1))))
        ax.plot(x, y, label=label)
        top.append(y[n // 4])
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("training LM loss, mean over seeds (EMA)")
    ax.set_title(_wrapped(exp.title), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    lo = min(statistics.fmean([r["test_loss"] for r in rs]) for rs in results.values()) - 0.3
    if top:
        ax.set_ylim(lo, max(max(top), lo + 0.5))
    fig.tight_layout()
    p = out / f"{exp.name}-loss_curves.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(exp.models)), 4.5))
    labels = [label for label, _ in exp.models]
    losses = [[r["test_loss"] for r in results[label]] for label in labels]
    means = [statistics.fmean(xs) for xs in losses]
    sds = [statistics.stdev(xs) if len(xs) > 1 else math.nan for xs in losses]  # one seed: no spread
    err = [0 if math.isnan(sd) else sd for sd in sds]
    ax.bar(range(len(labels)), means, yerr=err, capsize=6, color="tab:blue", alpha=0.8)
    for i, label in enumerate(labels):
        for r in results[label]:
            ax.plot(i, r["test_loss"], "k.", ms=5)
    ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
    lo, hi = min(means), max(means)
    pad = max(0.02, (hi - lo) * 0.6, max(err) * 2)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel("test loss (nats), mean +- std; dots: seeds")
    ax.set_title(_wrapped(exp.title), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    p = out / f"{exp.name}-test_loss.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    if analyses:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, runs in analyses.items():
            ratios = [r["ratio"] for r in runs[0]["disable_top"]]
            base = statistics.fmean(a["disable_top"][0]["loss"] for a in runs)
            y = [statistics.fmean(a["disable_top"][i]["loss"] for a in runs) - base for i in range(len(ratios))]
            ax.plot(ratios, y, "o-", label=label)
        ax.set_xlabel("ratio of disabled top routed experts")
        ax.set_ylabel("loss increase over r = 0 (nats)")
        ax.set_title("Fig. 4: disabling top routed experts", fontsize=10)
        paths.append(_finish(plt, fig, ax, out / f"{exp.name}-disable_top_experts.png"))
    return paths
