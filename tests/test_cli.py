"""The deepseek-moe command."""

from __future__ import annotations

import subprocess
import sys

from deepseek_moe.cli import main


def test_params_single_and_table(capsys):
    assert main(["params", "deepseekmoe-16b"]) == 0
    out = capsys.readouterr().out
    assert "16,375,728,128" in out and "16.38B" in out and "2.83B" in out
    assert "per 4K tokens" in out
    assert main(["params", "dense-2b", "hash-2b", "deepseekmoe-2b"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[0] for r in rows[1:]] == ["dense-2b", "hash-2b", "deepseekmoe-2b"]


def test_unknown_preset_is_a_clear_error(capsys):
    assert main(["params", "gpt-5"]) == 2
    assert "unknown preset 'gpt-5'" in capsys.readouterr().err


def test_presets_lists_the_paper_models(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("deepseekmoe-145b", "gshard-x1.5-2b", "moe-1+3of31-tiny", "hash-tiny"):
        assert name in out


def test_main_job_runs_on_real_text(capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert main(["main", "--batch-size", "1", "--seq-len", "64", "--save", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "LM loss" in out and "expert bal" in out
    assert "reloaded logits identical: True" in out
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "deepseek_moe", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "params" in r.stdout
