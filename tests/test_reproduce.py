"""deepseek-moe reproduce: every experiment end to end at a minimal size; the verdict logic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from deepseek_moe.reproduce import EXPERIMENTS, Settings, reproduce, verdict


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
    for png in ("loss_curves.png", "test_loss.png") + (("disable_top_experts.png",) if exp.analysis else ()):
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
