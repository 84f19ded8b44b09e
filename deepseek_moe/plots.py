"""PNG plots of a training run: the loss curve and the expert load (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from .config import DeepseekMoEConfig


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def plot_loss_curve(metrics: list[dict[str, Any]], path: Path, title: str = "") -> Optional[Path]:
    """Training LM loss (raw and smoothed) and validation loss against tokens seen."""
    steps = [r for r in metrics if "lm_loss" in r]
    if not steps:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = [r["tokens"] / 1e6 for r in steps]
    y = [r["lm_loss"] for r in steps]
    ax.plot(x, y, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
    alpha = min(1.0, max(0.02, 10 / len(y)))  # ~10% of the run: smooth, without a long lag
    ax.plot(x, _ema(y, alpha), color="tab:blue", lw=1.8, label=f"train (EMA {alpha:.2g})")
    val = [r for r in metrics if r.get("val_loss") is not None]
    if val:
        ax.plot([r["tokens"] / 1e6 for r in val], [r["val_loss"] for r in val], "o-",
                color="tab:red", label="validation")
        last = val[-1]
        ax.annotate(f"{last['val_loss']:.3f}", (last["tokens"] / 1e6, last["val_loss"]),
                    textcoords="offset points", xytext=(5, 8), color="tab:red")
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title or "training loss")
    lo = min(y + [r["val_loss"] for r in val])
    ax.set_ylim(lo - 0.1, min(max(y), lo + 4))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_expert_load(
    metrics: list[dict[str, Any]], config: DeepseekMoEConfig, path: Path, tail: float = 0.2
) -> Optional[Path]:
    """Left: tokens per expert / mean over the last ``tail`` of steps (1 = balanced), per MoE
    layer. Right: the load's coefficient of variation per layer over training."""
    rows = [r for r in metrics if r.get("tokens_per_expert")]
    if not rows:
        return None
    import numpy as np

    plt = _pyplot()
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
        ax2.plot(x, _ema(cv[:, j].tolist()), label=f"layer {layer}")
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
