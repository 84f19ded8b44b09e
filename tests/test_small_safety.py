"""Small safety fixes: prompts that are not UTF-8, validation before the prompt is echoed,
orphaned temporary checkpoint directories, and the modes of atomically written files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from deepseek_moe.checkpoint import save_pretrained
from deepseek_moe.cli import main
from deepseek_moe.generate import generate_text
from deepseek_moe.model import DeepseekForCausalLM
from deepseek_moe.presets import get_config

V = 300


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    from deepseek_moe.data.tokenizer import train_tokenizer

    return train_tokenizer(["hello world, the quick brown fox "] * 20, vocab_size=V)


def small() -> DeepseekForCausalLM:
    torch.manual_seed(0)
    return DeepseekForCausalLM(get_config("tiny", vocab_size=V, num_hidden_layers=2,
                                          first_k_dense_replace=1)).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer) -> Path:
    d = tmp_path_factory.mktemp("gen") / "ckpt"
    save_pretrained(small(), d)
    tokenizer.save(str(d / "tokenizer.json"))
    return d


# --- 1. a prompt that is not valid UTF-8 -----------------------------------------------------------

def test_prompt_not_utf8_is_a_value_error(tokenizer, ckpt, capsys):
    bad = os.fsdecode(b"hello \xff")  # what argv holds for these bytes on Linux
    with pytest.raises(ValueError, match="not valid UTF-8 text"):
        generate_text(small(), tokenizer, bad, 2)
    with pytest.raises(ValueError, match="prompt 1 is not valid UTF-8 text"):
        generate_text(small(), tokenizer, ["hello", bad], 2)
    assert main(["generate", str(ckpt), "--prompt", bad, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the prompt is not valid UTF-8 text")


# --- 2. every argument checked before the prompt is echoed ---------------------------------------

@pytest.mark.parametrize("extra", [
    ["--max-new-tokens", "-1"],
    ["--max-new-tokens", "5000"],  # beyond max_position_embeddings: needs the encoded prompt
    ["--temperature", "-1"],
    ["--top-p", "0"],
    ["--top-k", "0"],
])
def test_generate_cli_validates_before_echoing(ckpt, capsys, extra):
    assert main(["generate", str(ckpt), "--prompt", "hello brown fox", *extra]) == 2
    out, err = capsys.readouterr()
    assert "hello brown fox" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err


def test_generate_cli_empty_prompt_is_an_error_without_echo(ckpt, capsys):
    assert main(["generate", str(ckpt), "--prompt", "", "--max-new-tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error:") and "no tokens" in err


def test_generate_cli_still_echoes_and_streams(ckpt, capsys):
    assert main(["generate", str(ckpt), "--prompt", "hello", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("hello")


# --- 3. orphaned temporary directories are removed by the next save ------------------------------

def test_training_checkpoint_removes_orphan_tmp_dirs(tmp_path):
    from deepseek_moe.train_state import latest_checkpoint, save_training_checkpoint

    root = tmp_path / "checkpoints"
    orphans = [root / ".tmp-step-00000002-k1ll3d_x", root / ".tmp-step-00000004"]
    for o in orphans:
        (o / "step-00000002").mkdir(parents=True)
        (o / "step-00000002" / "config.json").write_text("{}")
    unrelated = [root / ".tmp-other", root / "notes.tmp-step-00000002"]
    for u in unrelated:
        u.mkdir()
    m = small()
    opt = torch.optim.AdamW(m.parameters())
    final = save_training_checkpoint(root, 6, m, opt, {"data_position": 0})
    assert latest_checkpoint(root) == final
    assert not any(o.exists() for o in orphans)
    assert all(u.is_dir() for u in unrelated)
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-step-")]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distributed_checkpoint_removes_orphan_tmp_dirs(tmp_path):
    from deepseek_moe.parallel.checkpoint import save_distributed_checkpoint

    root = tmp_path / "checkpoints"
    orphans = [root / ".tmp-step-00000002", root / ".tmp-step-00000002-released",
               root / ".tmp-step-00000002-released.tmp-abcd1234"]
    for o in orphans:
        o.mkdir(parents=True)
    (root / ".tmp-other").mkdir()
    m = small()
    opt = torch.optim.AdamW(m.parameters())
    old = os.umask(0o022)
    try:
        final = save_distributed_checkpoint(root, 4, m, opt, m.config, {"data_position": 0})
    finally:
        os.umask(old)
    assert (final / "trainer_state.json").is_file()
    assert modes_not_normal(final) == []
    assert not any(o.exists() for o in orphans)
    assert (root / ".tmp-other").is_dir()


def test_save_pretrained_removes_stale_siblings(tmp_path):
    target = tmp_path / "model"
    m = small()
    save_pretrained(m, target)
    stale = [tmp_path / ".model.tmp-abcd_123", tmp_path / ".model.old-0123abcd"]
    for s in stale:
        s.mkdir()
        (s / "model.safetensors").write_bytes(b"x" * 10)
    others = [tmp_path / ".model2.tmp-abcd_123", tmp_path / ".model.old-keepme"]
    for o in others:
        o.mkdir()
    save_pretrained(m, target)
    assert not any(s.exists() for s in stale)
    assert all(o.is_dir() for o in others)
    # Killed between the two renames: the old copy is the only one and survives until the new
    # checkpoint is in place.
    (tmp_path / ".model.old-89abcdef").mkdir()
    os.rename(target, tmp_path / ".model.old-89abcdef" / "x")
    save_pretrained(m, target)
    assert (target / "config.json").is_file() and not (tmp_path / ".model.old-89abcdef").exists()


# --- 4. atomically written files have the normal modes -------------------------------------------

def modes_not_normal(root: Path) -> list[tuple[str, str]]:
    """Everything under ``root`` whose mode is not what umask 0o022 gives (0o644 / 0o755)."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for names, want in ((dirnames, 0o755), (filenames, 0o644)):
            for name in names:
                mode = stat.S_IMODE(os.lstat(os.path.join(dirpath, name)).st_mode)
                if mode != want:
                    bad.append((os.path.join(dirpath, name), oct(mode)))
    return bad


def test_run_files_and_dirs_have_umask_modes(tmp_path):
    from deepseek_moe.train import TrainConfig, train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    import argparse, dataclasses, inspect, json, pathlib, textwrap, typing

    for mod in (argparse, json.decoder, pathlib, textwrap, typing, dataclasses, inspect):
        for i, chunk in enumerate(Path(mod.__file__).read_text().split("\ndef ")):
            (corpus / f"{Path(mod.__file__).stem}_{i}.py").write_text(chunk)
    out = tmp_path / "run"
    cfg = TrainConfig(
        preset="deepseekmoe-tiny", out=str(out), data_dir=str(tmp_path / "data"), sources=(),
        paths=(str(corpus),), vocab_size=300, seq_len=32, batch_size=4, steps=2, ckpt_every=1,
        keep=2, eval_sequences=4, progress=False, validation_fraction=0.1, test_fraction=0.1,
        model_overrides={"vocab_size": 300, "num_hidden_layers": 2, "hidden_size": 64,
                         "num_attention_heads": 4, "moe_intermediate_size": 24,
                         "n_routed_experts": 15, "num_experts_per_tok": 3})
    old = os.umask(0o022)
    try:
        train(cfg)
    finally:
        os.umask(old)
    assert (out / "checkpoints" / "latest").is_file()
    assert modes_not_normal(out) == []


def test_write_text_atomic_follows_the_umask(tmp_path):
    from deepseek_moe.atomic import write_text_atomic

    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
