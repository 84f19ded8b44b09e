"""The learning-rate study's controls in two figures (README, "Why DeepSeekMoE degrades above the
paper's rate"), from the ``reproduce --lr-sweep`` folders of ``reproductions/``:

* ``gate-scale.png``: validation loss at 1x and 4x the paper's rate, published routed gates
  against scaled ones, per model, every recorded seed; the table is printed.
* ``early-escape.png``: every recorded sweep run's final validation loss against the step at
  which its training loss (8-step mean) first fell below 6 nats, i.e. left the early plateau;
  the correlation per rate is printed.

    .venv/bin/python scripts/gate_scale_plot.py [--out reproductions/gate-scale.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "reproductions"

# panel -> [(variant, family, folders whose runs are its seeds)]
PANELS = {
    "GShard (0 shared + 2 of 16)": [
        ("renormalised gates (GShard's)", "gshard", ["table1", "fig3-seed1", "fig3-seed2"]),
        ("raw gates", "gshard", ["gshard-raw-gates"]),
        ("raw gates x 8", "gshard", ["gshard-raw-gates-x8"]),
    ],
    "1 shared + 1 of 15": [
        ("raw gate (published)", "moe-1+1of15", ["table1", "fig3-seed1", "fig3-seed2"]),
        ("raw gate x 15", "moe-1+1of15", ["fig3-routed-x15", "fig3-routed-x15-seed1", "fig3-routed-x15-seed2"]),
    ],
    "DeepSeekMoE (1 shared + 7 of 63)": [
        ("raw gates (published)", "deepseekmoe", ["table1", "fig3-seed1", "fig3-seed2"]),
        ("raw gates x 9", "deepseekmoe", ["fig3-routed-x9", "fig3-routed-x9-seed1", "fig3-routed-x9-seed2"]),
        ("raw gates, 200-step warmup (4x only)", "deepseekmoe",
         ["fig3-warmup200-seed0", "fig3-warmup200-seed1", "fig3-warmup200-seed2"], (4.0,)),
    ],
}
FACTORS = (1.0, 4.0)
PLATEAU = 6.0  # nats: the early plateau lies above (6.1-6.7)


def escape_step(result: dict, window: int = 8) -> int | None:
    """The first step at which the mean training loss of the last ``window`` steps (the run's
    recorded curve, one point per step) is below ``PLATEAU``; None: never."""
    per_step = result["tokens"] // result["steps"]
    curve = result["curve"]
    for i in range(window, len(curve) + 1):
        if statistics.fmean(loss for _, loss in curve[i - window:i]) < PLATEAU:
            return curve[i - 1][0] // per_step
    return None


def escapes() -> dict[str, list[tuple[int, float]]]:
    """(escape step, validation loss) of every recorded sweep run, per rate factor and warmup."""
    out: dict[str, list[tuple[int, float]]] = {}
    for res in sorted(ROOT.glob("*/runs/*-sweep/result.json")):
        r = json.loads(res.read_text())
        warmup = json.loads((res.parent / "train_config.json").read_text()).get("warmup_steps")
        step = escape_step(r)
        if step is not None:
            key = f"{r['lr_factor']:g}x the rate" + ("" if warmup is None else f", {warmup}-step warmup")
            out.setdefault(key, []).append((step, r["val_loss"]))
    return out


def correlation(xs, ys) -> float:
    """Pearson's r, or NaN where it is undefined (fewer than three points, or a constant side)."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return float("nan")
    return statistics.correlation(xs, ys)


def plot_escapes(plt, path: Path) -> None:
    data = escapes()
    fig, ax = plt.subplots(figsize=(10.5, 4.6))
    for key in sorted(data, key=lambda k: (float(k.split("x")[0]), k)):
        xs, ys = zip(*data[key])
        r = correlation(xs, ys)
        label = f"{key}: {len(xs)} run{'s' * (len(xs) > 1)}" + ("" if r != r else f", r = {r:.2f}")
        ax.plot(xs, ys, "o" if "warmup" not in key else "D", alpha=0.75, label=label)
        print(f"{key}: {len(xs)} runs, escape step {min(xs)}-{max(xs)}, validation loss "
              f"{min(ys):.3f}-{max(ys):.3f}" + ("" if r != r else f", correlation {r:.2f}"))
    ax.set_xlabel(f"step at which the training loss (8-step mean) first falls below {PLATEAU:g} nats")
    ax.set_ylabel("validation loss after 2.1M tokens")
    ax.set_title("Leaving the early plateau late costs the run: every sweep run in reproductions/\n"
                 "(512 steps; warmup 51 steps unless marked)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no point hidden
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def losses(family: str, folders: list[str], recorded: tuple[float, ...] = FACTORS) -> dict[float, list[float]]:
    """Validation loss per rate factor, one entry per folder (seed) that holds every rate of
    ``recorded`` (both, or 4x alone for a 4x-only control)."""
    out: dict[float, list[float]] = {f: [] for f in FACTORS}
    for folder in folders:
        runs = [ROOT / folder / "runs" / f"{family}-lr{f:g}x-sweep" / "result.json" for f in recorded]
        if recorded and all(r.is_file() for r in runs):
            for f, r in zip(recorded, runs):
                out[f].append(json.loads(r.read_text())["val_loss"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "gate-scale.png"))
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(13, 4.4), sharey=True)
    print("| model | routed gates | seeds | 1x | 4x | 4x - 1x (per seed) |")
    print("|---|---|---:|---:|---:|---|")
    for ax, (panel, variants) in zip(axes, PANELS.items()):
        for variant, family, folders, *rates in variants:
            ls = losses(family, folders, *rates)
            fs = [f for f in FACTORS if ls[f]]
            if not fs:
                continue
            n = len(ls[fs[0]])
            xs = [FACTORS.index(f) + 1 for f in fs]
            means = {f: statistics.fmean(ls[f]) for f in fs}
            line, = ax.plot(xs, [means[f] for f in fs], "o-" if len(fs) > 1 else "D", lw=2, ms=7,
                            label=f"{variant} ({n} seed{'s' * (n > 1)})")
            for i in range(n):
                ax.plot(xs, [ls[f][i] for f in fs], "-" if len(fs) > 1 else ".", lw=0.8, alpha=0.35,
                        color=line.get_color())
            cell = {f: f"{means[f]:.3f}" if f in means else "-" for f in FACTORS}
            if len(fs) == 2:
                deltas = ", ".join(f"{b - a:+.3f}" for a, b in zip(ls[1.0], ls[4.0]))
                change = f"{means[4.0] - means[1.0]:+.3f} ({deltas})"
            else:
                change = "-"
            print(f"| {panel} | {variant} | {n} | {cell[1.0]} | {cell[4.0]} | {change} |")
        ax.set_xticks([1, 2], ["1x = 1.08e-3", "4x = 4.32e-3"])
        ax.set_xlim(0.8, 2.2)
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("validation loss after 2.1M tokens")
    fig.suptitle("Routed gates' scale, warmup and the learning rate (512 steps, 51-step warmup unless said; "
                 "thick: mean over seeds; thin: each seed)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    plot_escapes(plt, Path(args.out).with_name("early-escape.png"))


if __name__ == "__main__":
    main()
