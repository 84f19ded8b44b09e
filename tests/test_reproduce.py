"""deepseek-moe reproduce: every experiment end to end at a minimal size; the verdict logic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from deepseek_moe.reproduce import EXPERIMENTS, RunLock, Settings, reproduce, run_dir, train_one, verdict


def test_verdict_follows_the_numbers():
    assert verdict([1.0, 1.01, 0.99], [2.0, 2.01, 1.99], "less")[0] == "holds"
    assert verdict([2.0, 2.01, 1.99], [1.0, 1.01, 0.99], "less")[0] == "does not hold"
    assert verdict([1.0, 1.2, 0.8], [1.05, 1.25, 0.85], "less")[0] == "undecided"
    assert verdict([1.0], [2.0], "less")[0] == "undecided"  # one seed: no spread
    assert verdict([1.0, 1.2, 0.8], [1.05, 1.25, 0.85], "similar")[0] == "holds"
    assert verdict([1.0, 1.01, 0.99], [2.0, 2.01, 1.99], "similar")[0] == "does not hold"
    v, why = verdict([1.0, 1.02], [1.1, 1.12], "less")  # diff -0.1, 2 x se = 2 x 0.01414
    assert v == "holds" and "-0.1000" in why and "0.0283" in why


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import argparse as _argparse
    import json as _json
    import textwrap as _tw

    d = tmp_path_factory.mktemp("repro_corpus")
    for mod in (_argparse, _json.decoder, _tw):  # one document per function or method
        for i, chunk in enumerate(re.split(r"\n(?=def |class |    def )", Path(mod.__file__).read_text())):
            (d / f"{mod.__name__}_{i}.py").write_text(chunk)
    out = tmp_path_factory.mktemp("repro")
    s = Settings(seeds=2, tokens=2 * 4 * 32, seq_len=32, batch_size=4, vocab_size=400, eval_tokens=512,
                 sources=(), paths=(str(d),), validation_fraction=0.1, progress=False,
                 data_dir=str(out / "data"),
                 extra_overrides={"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                  "num_key_value_heads": 2})
    return out, s


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_each_experiment_end_to_end(tiny, name, capsys):
    out, s = tiny
    path = reproduce(name, out / name, s)
    text = path.read_text()
    exp = EXPERIMENTS[name]
    assert text.startswith(f"# {exp.title}")
    results = {}
    for label, family in exp.models:
        row = next(r for r in text.splitlines() if r.startswith(f"| {label} | {family}-tiny |"))
        seeds = [json.loads((out / name / "runs" / f"{family}-seed{i}" / "result.json").read_text())["test_loss"]
                 for i in range(2)]
        results[label] = seeds
        assert f"{seeds[0]:.4f}, {seeds[1]:.4f}" in row  # per-seed losses in the table
    for c in exp.claims:  # each claim's verdict is the one the numbers give
        line = next(r for r in text.splitlines() if r.startswith(f"| {c.text} |"))
        assert f"**{verdict(results[c.a], results[c.b], c.kind)[0]}**" in line
    assert path == out / name / f"report-{name}.md"
    for png in ("loss_curves.png", "test_loss.png") + (("disable_top_experts.png",) if exp.analysis else ()):
        png = f"{name}-{png}"
        assert (out / name / png).stat().st_size > 5000 and f"]({png})" in text
    if exp.analysis:
        assert "Disabling top routed experts (Fig. 4)" in text and "shared expert off" in text
        assert re.search(r"Claim: DeepSeekMoE's loss rises more .*\*\*(holds|does not hold|undecided)\*\*", text)
    assert exp.title in capsys.readouterr().out  # the report is printed too


def test_finished_runs_are_reused(tiny, monkeypatch):
    out, s = tiny
    import deepseek_moe.train as train_mod

    reproduce("table1", out / "table1", s)  # already run above (or now)
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    reproduce("table1", out / "table1", s)
    with pytest.raises(ValueError, match="unknown experiment 'table9'"):
        reproduce("table9", out / "x", s)


def test_run_lock(tmp_path):
    import subprocess
    import sys

    a, b = RunLock(tmp_path / "r"), RunLock(tmp_path / "r")
    assert a.acquire() and not b.acquire()  # held by this (live) process
    a.release()
    assert b.acquire()
    b.release()
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # a pid that no longer exists: its lock is stale and taken over
    import socket

    (tmp_path / "r" / ".lock").write_text(f"{socket.gethostname()} {p.pid}\n")
    assert a.acquire()
    a.release()
    assert not (tmp_path / "r" / ".lock").exists()


def test_two_experiments_share_runs_and_wait_for_each_other(tiny, monkeypatch, capsys):
    """fig3 then table1 in one folder: table1 reuses fig3's GShard and DeepSeekMoE runs, each
    writes its own report, and a run that another live process holds is put off until it is
    free (here: until that process exits, leaving a stale lock that is taken over)."""
    import subprocess
    import sys

    import deepseek_moe.train as train_mod

    out, s = tiny
    shared = out / "shared"
    reproduce("fig3", shared, s)
    trained = []
    real_train = train_mod.train
    monkeypatch.setattr(train_mod, "train", lambda cfg, **k: trained.append(cfg.out) or real_train(cfg, **k))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    import threading

    threading.Thread(target=holder.wait, daemon=True).start()  # reap it, as init would a stranger
    import socket

    lock = run_dir(shared, "dense", 0) / ".lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{socket.gethostname()} {holder.pid}\n")
    assert train_one(shared, "dense", 0, s) is None  # held by a live process: not trained here
    capsys.readouterr()
    reproduce("table1", shared, s, poll_s=0.5)
    holder.wait()
    printed = capsys.readouterr().out
    assert "dense-seed0 is being trained by another process; later" in printed
    assert printed.count("[1/10] Dense (dense-tiny), seed 0") == 2  # put off, then taken up
    assert "[10/10] DeepSeekMoE (deepseekmoe-tiny), seed 1" in printed
    assert sorted(Path(t).name for t in trained) == sorted(
        f"{f}-seed{i}" for f in ("dense", "hash", "switch") for i in range(2))
    assert trained.index(str(run_dir(shared, "dense", 0))) > 0  # put off, not first
    assert not lock.exists()
    for name in ("fig3", "table1"):
        assert (shared / f"report-{name}.md").read_text().startswith(f"# {EXPERIMENTS[name].title}")
        assert (shared / f"{name}-test_loss.png").is_file()


@pytest.mark.parametrize("factors", [(1.0, 8.0), (0.001, 1.0)])
def test_lr_sweep_end_to_end(tiny, factors, capsys):
    """--lr-sweep: each model's rate is the argmin of its sweep's validation losses, and the
    report's two tables and the sweep table follow the runs' own numbers; where the best rate is
    the one recipe's, its runs serve both tables."""
    import dataclasses

    out, s = tiny
    s = dataclasses.replace(s, lr_sweep=factors, sweep_tokens=4 * 4 * 32)
    exp = EXPERIMENTS["shared-ratio"]
    out = out / f"sweep-{factors[0]:g}"
    text = reproduce("shared-ratio", out / "sweep", s).read_text()
    printed = capsys.readouterr().out
    one, rest = text.split("## Each model at its best rate")
    tuned_part, sweep_part = rest.split("## Learning-rate sweep")
    for label, family in exp.models:
        val = {f: json.loads((run_dir(out / "sweep", family, 0, f, sweep=True) / "result.json").read_text())["val_loss"]
               for f in factors}
        best = min(val, key=val.get)
        assert best == 1.0 or factors[0] != 0.001  # 1/1000 of the rate learns nothing in this budget
        row = next(r for r in sweep_part.splitlines() if r.startswith(f"| {label} |"))
        assert row.endswith(f"| {best:g}x |") and f"**{val[best]:.4f}**" in row
        for part, f in ((one, 1.0), (tuned_part, best)):
            seeds = [json.loads((run_dir(out / "sweep", family, i, f) / "result.json").read_text())["test_loss"]
                     for i in range(2)]
            row = next(r for r in part.splitlines() if r.startswith(f"| {label} | {family}-tiny "))
            assert f"{seeds[0]:.4f}, {seeds[1]:.4f}" in row
        machine = json.loads((run_dir(out / "sweep", family, 0, 1.0) / "result.json").read_text())["machine"]
        assert machine["torch"] == torch.__version__ and machine["threads"] == torch.get_num_threads()
        assert f"Computed on {machine['device']}, torch {torch.__version__}, " in text
        if best == 1.0:  # the tuned runs are the one recipe's: reused, not trained again
            assert not list((out / "sweep" / "runs").glob(f"{family}-lr*-seed*"))
        else:
            assert json.loads((run_dir(out / "sweep", family, 0, best) / "result.json").read_text())["lr"] == s.lr * best
    for c in exp.claims:  # a verdict per claim in each regime
        assert sum(r.startswith(f"| {c.text} |") for r in text.splitlines()) == 2
    # the settings line states the warmup the runs had: the sweep's own, the full runs' own
    sweep_w = _warmup_of(run_dir(out / "sweep", "deepseekmoe", 0, factors[0], sweep=True))
    full_w = _warmup_of(run_dir(out / "sweep", "deepseekmoe", 0, 1.0))
    assert f"warmup 10% of each run ({sweep_w} steps in the sweep, {full_w} steps in the full runs)" in text
    assert (out / "sweep" / "shared-ratio-lr_sweep.png").stat().st_size > 5000
    assert "](shared-ratio-lr_sweep.png)" in text
    # the sweep's table is printed as the sweep ends, before the first run at the chosen rates
    before = printed[:printed.index("[1/")]
    for label, _ in exp.models:
        row = next(r for r in sweep_part.splitlines() if r.startswith(f"| {label} |"))
        assert row in before


def _warmup_of(run: Path) -> int:
    """The warmup a run trained with, read from its logged learning rates: the first step at the peak."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    peak = json.loads((run / "train_config.json").read_text())["lr"]
    return next(r["step"] for r in rows if r["lr"] >= peak * (1 - 1e-9))


def test_best_factor_is_the_argmin():
    from deepseek_moe.reproduce import best_factor

    assert best_factor({0.5: 3.1, 1.0: 3.0, 2.0: 2.9, 4.0: 3.3}) == 2.0
    assert best_factor({0.5: 3.0, 1.0: 3.0}) == 0.5  # a tie: the smaller rate


def test_sweep_table_flags_a_best_rate_at_the_edge():
    """A model whose best rate is the sweep's largest or smallest factor is named under the table:
    its optimum may lie outside the sweep."""
    from deepseek_moe.reproduce import best_factor, sweep_table

    exp = EXPERIMENTS["shared-ratio"]
    (a, _), (b, _), (c, _) = exp.models
    sweep = {a: {0.5: 3.0, 1.0: 3.1, 2.0: 3.2}, b: {0.5: 3.2, 1.0: 3.0, 2.0: 3.1},
             c: {0.5: 3.3, 1.0: 3.2, 2.0: 3.1}}
    best = {label: best_factor(v) for label, v in sweep.items()}
    text = "\n".join(sweep_table(exp, sweep, best, Settings()))
    assert f"At the edge of the sweep, so the best rate may lie beyond it: {a} (0.5x), {c} (2x)." in text
    sweep[a], sweep[c] = sweep[b], sweep[b]
    best = {label: best_factor(v) for label, v in sweep.items()}
    assert "edge" not in "\n".join(sweep_table(exp, sweep, best, Settings()))


def test_sweep_only_a_subset_under_a_control(tiny, capsys, monkeypatch):
    """--sweep-only --models gshard dense --set norm_topk_prob=false --sweep-seed 1: only those
    models' sweep runs, with that seed and override, and a sweep report; the same folder refuses
    other settings instead of reusing runs trained under these."""
    import dataclasses

    from deepseek_moe.cli import main

    out, s = tiny
    out = out / "control"
    s = dataclasses.replace(s, lr_sweep=(1.0, 2.0), sweep_tokens=4 * 4 * 32, sweep_only=True,
                            models=("gshard", "Dense"), sweep_seed=1, warmup_steps=3,
                            extra_overrides={**s.extra_overrides, "norm_topk_prob": False})
    import deepseek_moe.plots as plots

    titles = []
    plot_lr_sweep = plots.plot_lr_sweep
    monkeypatch.setattr(plots, "plot_lr_sweep", lambda *a, **k: titles.append(a[5:]) or plot_lr_sweep(*a, **k))
    path = reproduce("table1", out, s)
    assert path == out / "report-table1-lr_sweep.md"
    assert titles == [("warmup 3 steps",)]  # the plot's title states the sweep's warmup
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["dense-lr1x-sweep", "dense-lr2x-sweep", "gshard-lr1x-sweep", "gshard-lr2x-sweep"]
    for run in runs:
        cfg = json.loads((out / "runs" / run / "train_config.json").read_text())
        assert cfg["seed"] == 1 and cfg["model_overrides"]["norm_topk_prob"] is False
    text = path.read_text()
    for label, family in (("Dense", "dense"), ("GShard", "gshard")):
        val = {f: json.loads((run_dir(out, family, 1, f, sweep=True) / "result.json").read_text())["val_loss"]
               for f in (1.0, 2.0)}
        row = next(r for r in text.splitlines() if r.startswith(f"| {label} |"))
        assert f"{val[1.0]:.4f}" in row and f"{val[2.0]:.4f}" in row
    assert text.startswith("# Table 1: DeepSeekMoE vs the MoE baselines and Dense (equal total and activated "
                           "parameters); only Dense, GShard\n")
    assert "| Switch |" not in text and re.search(r"Every model with [^\n]*norm_topk_prob=false\.", text)
    assert "seed 1" in text and (out / "table1-lr_sweep.png").stat().st_size > 5000
    assert "; warmup 3 steps;" in text and _warmup_of(out / "runs" / "gshard-lr2x-sweep") == 3
    assert "[1/" not in capsys.readouterr().out  # no run after the sweep
    # another control into the same folder: refused by name, nothing trained
    other = dataclasses.replace(s, extra_overrides={**s.extra_overrides, "norm_topk_prob": True})
    with pytest.raises(ValueError, match=r"dense-lr1x-sweep was trained with other settings \(model_overrides"):
        reproduce("table1", out, other)
    with pytest.raises(ValueError, match="table1 has no model 'mixtral'; its models: dense \\(Dense\\)"):
        reproduce("table1", out, dataclasses.replace(s, models=("mixtral",)))
    assert main(["reproduce", "table1", "--out", str(out), "--sweep-only"]) == 2
    assert "error: --sweep-only needs --lr-sweep" in capsys.readouterr().err


def test_a_subset_keeps_the_claims_between_its_models():
    from deepseek_moe.reproduce import select_models

    exp = select_models(EXPERIMENTS["table1"], ("gshard", "deepseekmoe", "Dense"))
    assert [f for _, f in exp.models] == ["dense", "gshard", "deepseekmoe"]
    assert {(c.a, c.b) for c in exp.claims} == {("GShard", "Dense"), ("DeepSeekMoE", "GShard")}
    assert set(exp.paper) == {"Dense", "GShard", "DeepSeekMoE"}
    assert select_models(exp, ()) is exp


def test_reproduce_command_passes_the_control_options(monkeypatch, tmp_path):
    import deepseek_moe.reproduce as rep
    from deepseek_moe.cli import main

    seen = {}
    monkeypatch.setattr(rep, "reproduce", lambda name, out, s: seen.update(name=name, out=out, s=s))
    assert main(["reproduce", "fig3", "--out", str(tmp_path), "--lr-sweep", "1", "4", "--sweep-only",
                 "--sweep-seed", "3", "--models", "gshard", "deepseekmoe", "--set", "norm_topk_prob=false",
                 "--set", "routed_scaling_factor=9", "--warmup-steps", "7"]) == 0
    s = seen["s"]
    assert seen["name"] == "fig3" and s.lr_sweep == (1.0, 4.0) and s.sweep_only and s.sweep_seed == 3
    assert s.models == ("gshard", "deepseekmoe") and s.warmup_steps == 7
    assert s.extra_overrides == {"norm_topk_prob": False, "routed_scaling_factor": 9}
    cfg = s.run_config(tmp_path / "runs" / "x", "gshard", 3, 4.0, sweep=True)
    assert cfg.warmup_steps == 7 and cfg.model_overrides["routed_scaling_factor"] == 9
