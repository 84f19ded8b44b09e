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


def test_train_command_end_to_end(capsys, tmp_path):
    import argparse as _argparse
    import json as _json

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for mod in (_argparse, _json.decoder, _json.encoder):
        for i, chunk in enumerate(open(mod.__file__).read().split("\ndef ")):
            (corpus / f"{i}_{mod.__name__}.py").write_text(chunk)
    args = ["train", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"),
            "--sources", "--text", str(corpus), "--vocab-size", "400", "--steps", "3", "--validation-fraction", "0.1",
            "--seq-len", "32", "--batch-size", "2", "--no-progress",
            "--set", "vocab_size=400", "--set", "num_hidden_layers=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "steps:           3 of 3" in out and "validation loss:" in out
    assert "loss_curve.png" in out and "expert_load.png" in out
    # The checkpoint is in the released layout.
    assert (tmp_path / "run/checkpoints/step-00000003/config.json").is_file()
    assert main(args[:1] + ["--out", str(tmp_path / "r2")]) == 2  # no budget
    assert "budget" in capsys.readouterr().err
    # The checkpoint carries its tokenizer: generation needs nothing else.
    ckpt = tmp_path / "run/checkpoints/step-00000003"
    assert (ckpt / "tokenizer.json").is_file()
    assert main(["generate", str(ckpt), "--prompt", "def main(", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def main(")
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "deepseek_moe", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "params" in r.stdout


def test_a_model_over_the_memory_budget_is_a_one_line_error(run, capsys):
    """generate, eval and analyze check the weights against --max-memory before loading them: a
    dtype that copies them (bf16 from the run's fp32) over the budget is a one-line error; left
    to choose, they keep the stored weights memory-mapped, which allocates nothing."""
    from deepseek_moe.cli import main

    for argv in (["generate", str(run), "--prompt", "def", "--max-memory", "64KiB", "--dtype", "bfloat16"],
                 ["eval", str(run), "--max-memory", "64KiB", "--dtype", "bfloat16", "--no-progress"],
                 ["analyze", str(run), "--max-memory", "64KiB", "--dtype", "bfloat16", "--no-progress"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: loading ")
        assert err.endswith("but the memory budget is 64 KiB (--max-memory 64KiB)")
    assert main(["generate", str(run), "--prompt", "def", "--max-memory", "64KiB", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def")
