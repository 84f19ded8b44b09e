"""The committed reproduction records (``reproductions/EXPERIMENT``: ``reproduce --out`` folders
holding each run's ``result.json`` and ``train_config.json``) are what ``reproduce`` reuses: each
run's folder is the one ``run_dir`` names for its result, and the result agrees with the settings
it was trained with."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from deepseek_moe.reproduce import Settings, run_dir

ROOT = Path(__file__).resolve().parent.parent / "reproductions"
RESULTS = sorted(ROOT.glob("*/runs/*/result.json"))
NAME = re.compile(r"^(?P<family>.+?)(-lr(?P<factor>[0-9.]+)x)?-(seed(?P<seed>\d+)|sweep)$")


@pytest.mark.skipif(not RESULTS, reason="no reproduction records in this checkout")
@pytest.mark.parametrize("path", RESULTS, ids=lambda p: f"{p.parts[-4]}/{p.parts[-2]}")
def test_a_recorded_run_is_what_its_folder_says(path: Path):
    run = path.parent
    r = json.loads(path.read_text())
    cfg = json.loads((run / "train_config.json").read_text())
    m = NAME.match(run.name)
    assert m, f"{run.name} is not a run folder name of reproduce"
    sweep = m["seed"] is None
    assert run_dir(run.parent.parent, r["family"], r["seed"], r["lr_factor"], sweep) == run
    assert cfg["preset"] == f"{r['family']}-tiny" and cfg["seed"] == r["seed"]
    assert math.isclose(cfg["lr"], r["lr"]) and math.isclose(r["lr"], Settings().lr * r["lr_factor"])
    assert r["tokens"] == cfg["tokens"] and r["steps"] * cfg["seq_len"] * cfg["batch_size"] == r["tokens"]
    loss = r["val_loss" if sweep else "test_loss"]
    assert math.isfinite(loss) and 0 < loss < math.log(cfg["vocab_size"])
    split = r["validation" if sweep else "test"]
    assert math.isclose(split["all"], loss)
    assert r["curve"] and r["curve"][-1][0] <= r["tokens"]
    if "machine" in r:  # runs recorded before 2026-12-02 13:30 do not say where they ran
        assert r["machine"]["torch"] and r["machine"]["device"] and r["machine"]["threads"] >= 1


@pytest.mark.skipif(not RESULTS, reason="no reproduction records in this checkout")
def test_gate_scale_figure_follows_the_records(tmp_path):
    """scripts/gate_scale_plot.py: each row's means are the recorded seeds' validation losses."""
    import statistics
    import subprocess
    import sys

    script = ROOT.parent / "scripts" / "gate_scale_plot.py"
    r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "g.png")],
                       capture_output=True, text=True, check=True)
    row = "| DeepSeekMoE (1 shared + 7 of 63) | raw gates (published) |"
    rows = [line for line in r.stdout.splitlines() if line.startswith(row)]
    assert len(rows) == 1
    runs = [ROOT / d / "runs" / "deepseekmoe-lr1x-sweep" for d in ("table1", "fig3-seed1", "fig3-seed2")]
    seeds = [json.loads((run / "result.json").read_text())["val_loss"] for run in runs
             if (run / "result.json").is_file() and (run.parent / "deepseekmoe-lr4x-sweep" / "result.json").is_file()]
    cells = [c.strip() for c in rows[0].split("|")]
    assert int(cells[3]) == len(seeds) and cells[4] == f"{statistics.fmean(seeds):.3f}"
    assert (tmp_path / "g.png").stat().st_size > 20_000


def test_escape_step_is_where_the_smoothed_loss_leaves_the_plateau():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gsp", ROOT.parent / "scripts" / "gate_scale_plot.py")
    gsp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gsp)
    curve = [(4 * step, 7.0 if step <= 12 else 5.0) for step in range(1, 21)]
    # the 8-step mean first falls below 6 nats when 5 of its 8 steps are past step 12
    assert gsp.escape_step({"tokens": 80, "steps": 20, "curve": curve}) == 17
    assert gsp.escape_step({"tokens": 80, "steps": 20, "curve": [(4 * s, 6.5) for s in range(1, 21)]}) is None
    # runs that all leave the plateau at one step have no correlation, not an error
    assert gsp.correlation([120, 120, 120], [4.1, 4.2, 4.0]) != gsp.correlation([120, 120, 120], [4.1, 4.2, 4.0])
    assert abs(gsp.correlation([1, 2, 3], [2.0, 4.0, 6.0]) - 1.0) < 1e-12
