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


@pytest.mark.parametrize("nproc,ep,fsdp", [(2, 2, False), (4, 4, False), (2, 2, True), (4, 2, True),
                                           (2, 1, False)])
def test_parallel_steps_equal_single_process(tmp_path, nproc, ep, fsdp):
    out = tmp_path / "result.json"
    torchrun(nproc, str(WORKER), "--ep", str(ep), "--out", str(out), *(["--fsdp"] if fsdp else []))
    r = json.loads(out.read_text())
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
    with pytest.raises(ValueError, match="dropless"):
        ParallelPlan(world=2, ep=2).validate(get_config("gshard-tiny", capacity_factor=1.25), launched=2)
    ParallelPlan(world=4, ep=2).validate(get_config("gshard-tiny"), launched=4)  # fine
