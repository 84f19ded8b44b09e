"""torch.distributed on CPU (gloo): expert parallelism, EP x FSDP2, sharded checkpoints.

Each case launches torchrun with several processes running tests/dist_worker.py, which compares
the parallel run with a single-process one over the same global batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deepseek_moe.parallel.mesh import ParallelPlan
from deepseek_moe.presets import get_config

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.mark.parametrize("nproc,ep,fsdp,capacity", [
    (2, 2, False, None), (4, 4, False, None), (2, 2, True, None), (4, 2, True, None), (2, 1, False, None),
    (2, 2, False, 0.5), (4, 4, False, 0.5), (2, 1, False, 0.5)])
def test_parallel_steps_equal_single_process(tmp_path, nproc, ep, fsdp, capacity):
    out = tmp_path / "result.json"
    torchrun(nproc, str(WORKER), "--ep", str(ep), "--out", str(out), *(["--fsdp"] if fsdp else []),
             *(["--capacity", str(capacity)] if capacity else []))
    r = json.loads(out.read_text())
    if capacity:
        assert r["dropped"] > 0  # the capacity drops assignments, and still the runs agree
    assert r["keys_match"]
    assert len(r["losses"]) == 5
    assert r["loss_diff"] < 1e-5, r  # forward/backward and 5 AdamW steps
    assert r["param_diff"] < 1e-5, r
    # the device-level loss over the real expert groups (the ep ranks) equals eq. 15 with D groups
    assert r["device_loss_diff"] < 1e-5, r
    if ep == 1:
        assert r["ep1_exact"] is True  # expert-parallel size 1 is the local path, bit for bit


def test_plan_errors_before_any_work():
    cfg = get_config("deepseekmoe-tiny")  # 63 routed experts
    with pytest.raises(ValueError, match="63 routed experts cannot be split evenly over an expert-parallel size of 2"):
        ParallelPlan(world=2, ep=2).validate(cfg, launched=2)
    with pytest.raises(ValueError, match="the mesh needs 4 processes but 2 were launched"):
        ParallelPlan(world=4, ep=2).validate(get_config("gshard-tiny"), launched=2)
    with pytest.raises(ValueError, match="world size 6 is not a multiple of the expert-parallel size 4"):
        ParallelPlan(world=6, ep=4).validate(get_config("gshard-tiny"), launched=6)
    with pytest.raises(ValueError, match="dense"):
        ParallelPlan(world=2, ep=2).validate(get_config("dense-tiny"), launched=2)
    ParallelPlan(world=2, ep=2).validate(get_config("gshard-tiny", capacity_factor=1.25), launched=2)
    ParallelPlan(world=4, ep=2).validate(get_config("gshard-tiny"), launched=4)  # fine


# --- training through the command line, checkpoints across layouts ---------------------------------
MODEL = ["--set", "vocab_size=400", "--set", "num_hidden_layers=2", "--set", "hidden_size=32",
         "--set", "num_attention_heads=4", "--set", "moe_intermediate_size=16", "--set", "n_routed_experts=8",
         "--set", "num_experts_per_tok=2", "--set", "n_device_groups=2", "--set", "device_aux_loss_alpha=0.05"]


@pytest.fixture(scope="module")
def train_args(tmp_path_factory) -> list[str]:
    import argparse as _argparse
    import json as _json
    import textwrap as _tw

    d = tmp_path_factory.mktemp("dist_corpus")
    for mod in (_argparse, _json.decoder, _tw):
        for i, chunk in enumerate(Path(mod.__file__).read_text().split("\ndef ")):
            (d / f"{mod.__name__}_{i}.py").write_text(chunk)
    return ["train", "--data-dir", str(d.parent / "dist_data"), "--sources", "--text", str(d),
            "--vocab-size", "400", "--validation-fraction", "0.1", "--seq-len", "32", "--batch-size", "4",
            "--no-progress", "--eval-sequences", "4", "--lr", "1e-3", "--steps", "6", "--ckpt-every", "3",
            *MODEL]


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def single(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "deepseek_moe", *args], capture_output=True, text=True,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_checkpoints_resume_under_another_layout_and_export(train_args, tmp_path):
    import shutil

    import torch

    from deepseek_moe.checkpoint import load_pretrained
    from deepseek_moe.parallel.checkpoint import DCP_DIR

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    torchrun(2, "-m", "deepseek_moe", *train_args, "--out", str(a), "--expert-parallel", "2")
    ref = losses(a)
    assert len(ref) == 6  # rank 0 alone writes the metrics
    ckpt = a / "checkpoints" / "step-00000006"
    assert (ckpt / DCP_DIR / ".metadata").is_file() and (ckpt / "model.safetensors").is_file()

    # saved at 2 ranks (EP 2), resumed at 1 process and at 4 ranks (mesh dp 2 x ep 2). The
    # device-level loss groups experts by ep rank, so EP 2 keeps the D = 2 of the saved run.
    torchrun(2, "-m", "deepseek_moe", *train_args, "--out", str(b), "--expert-parallel", "2", "--stop-after", "3")
    b4 = tmp_path / "b4"
    shutil.copytree(b, b4)
    single(*train_args, "--out", str(b), "--resume")
    torchrun(4, "-m", "deepseek_moe", *train_args, "--out", str(b4), "--expert-parallel", "2", "--resume")
    # saved by one process, resumed at 2 ranks with EP 2 x FSDP2
    single(*train_args, "--out", str(c), "--stop-after", "3")
    torchrun(2, "-m", "deepseek_moe", *train_args, "--out", str(c), "--expert-parallel", "2", "--fsdp", "--resume")
    for run in (b, b4, c):
        got = losses(run)
        assert len(got) == 6
        assert max(abs(x - y) for x, y in zip(got[3:], ref[3:])) < 1e-5, (run.name, got, ref)

    # export from the sharded state equals the released layout rank 0 wrote beside it
    out = tmp_path / "exported"
    single("export", str(a), str(out))
    exported, written = load_pretrained(out).state_dict(), load_pretrained(ckpt).state_dict()
    assert exported.keys() == written.keys()
    assert all(torch.equal(exported[k], written[k]) for k in exported)
    assert (out / "tokenizer.json").is_file()


def test_train_refuses_a_layout_before_any_work(train_args, tmp_path, capsys):
    from deepseek_moe.cli import main

    data = tmp_path / "never"
    args = [x if x != train_args[2] else str(data) for x in train_args]
    assert main([*args, "--out", str(tmp_path / "r"), "--expert-parallel", "2"]) == 2
    assert "needs at least 2 processes" in capsys.readouterr().err
    assert not data.exists() and not (tmp_path / "r").exists()
    assert main([*args, "--out", str(tmp_path / "r"), "--expert-parallel", "3"]) == 2
    assert "8 routed experts cannot be split evenly over an expert-parallel size of 3" in capsys.readouterr().err
