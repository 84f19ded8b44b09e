"""`export` never destroys what it did not create: the source checkpoint, a training checkpoint,
a run or an unrelated folder are refused (even with --force); --force replaces only an export."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from deepseek_moe.checkpoint import CheckpointError, load_pretrained
from deepseek_moe.cli import main
from deepseek_moe.parallel.checkpoint import export_released
from deepseek_moe.runs import resolve_checkpoint


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), and every directory (-> b"/")."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"/")
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def ckpt(run, tmp_path) -> Path:
    """A private copy of the session run's latest training checkpoint."""
    src, _ = resolve_checkpoint(run)
    dst = tmp_path / "run" / "checkpoints" / src.name
    shutil.copytree(src, dst)
    assert (dst / "trainer_state.json").is_file() and (dst / "optimizer.safetensors").is_file()
    assert (dst / "tokenizer.json").is_file()
    return dst


def test_export_onto_itself_is_refused_and_keeps_every_file(ckpt, capsys):
    before = snapshot(ckpt)
    for force in ([], ["--force"]):
        assert main(["export", str(ckpt), str(ckpt), *force]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "onto itself" in err and err.count("\n") == 1
        # the same directory spelled differently
        assert main(["export", str(ckpt), str(ckpt / ".." / ckpt.name), *force]) == 2
        assert "onto itself" in capsys.readouterr().err
        assert snapshot(ckpt) == before
    assert resolve_checkpoint(ckpt)[0] == ckpt
    assert main(["generate", str(ckpt), "--prompt", "def main(", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def main(")


def test_export_inside_or_around_the_source_is_refused(ckpt, capsys):
    run = ckpt.parent.parent
    before = snapshot(run)
    assert main(["export", str(ckpt), str(ckpt / "exported"), "--force"]) == 2
    assert "inside the source checkpoint" in capsys.readouterr().err
    for around in (ckpt.parent, run):
        assert main(["export", str(ckpt), str(around), "--force"]) == 2
        assert "contains the source checkpoint" in capsys.readouterr().err
    assert snapshot(run) == before
    with pytest.raises(CheckpointError, match="onto itself"):
        export_released(ckpt, ckpt, force=True)  # the Python API is guarded too


def test_export_onto_another_training_checkpoint_is_refused_even_with_force(ckpt, tmp_path, capsys):
    other = tmp_path / "other" / "step-00000001"
    shutil.copytree(ckpt, other)
    before = snapshot(other)
    for force in ([], ["--force"]):
        assert main(["export", str(ckpt), str(other), *force]) == 2
        err = capsys.readouterr().err
        assert "refusing to overwrite" in err and err.count("\n") == 1
        for name in ("trainer_state.json", "optimizer.safetensors", "config.json"):
            assert name in err
        assert snapshot(other) == before
    assert main(["generate", str(other), "--prompt", "x", "--max-new-tokens", "1"]) == 0


def test_export_into_a_non_empty_unrelated_folder_is_refused(ckpt, tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep me\n")
    (folder / "sub").mkdir()
    before = snapshot(folder)
    for force in ([], ["--force"]):
        assert main(["export", str(ckpt), str(folder), *force]) == 2
        err = capsys.readouterr().err
        assert "todo.txt" in err and "sub/" in err
        assert snapshot(folder) == before
    # also a folder holding a released file beside something else
    (folder / "config.json").write_text("{}\n")
    before = snapshot(folder)
    assert main(["export", str(ckpt), str(folder), "--force"]) == 2
    assert "todo.txt" in capsys.readouterr().err
    assert snapshot(folder) == before


def test_export_to_a_new_folder_then_again_needs_force(ckpt, tmp_path, capsys, monkeypatch):
    import deepseek_moe.parallel.checkpoint as pc

    out = tmp_path / "released"
    source = snapshot(ckpt)
    assert main(["export", str(ckpt), str(out)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "tokenizer.json"]
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    got, want = load_pretrained(out).state_dict(), load_pretrained(ckpt).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert snapshot(ckpt) == source

    # a second export into the same OUT: refused without --force, before loading the model
    first = snapshot(out)
    loads = []
    monkeypatch.setattr(pc, "load_pretrained", lambda *a, **k: loads.append(a) or load_pretrained(*a, **k))
    assert main(["export", str(ckpt), str(out)]) == 2
    err = capsys.readouterr().err
    assert "config.json, model.safetensors, tokenizer.json" in err and "--force" in err
    assert loads == [] and snapshot(out) == first
    # an empty OUT is fine without --force
    (tmp_path / "empty").mkdir()
    assert main(["export", str(ckpt), str(tmp_path / "empty")]) == 0
    # with --force it is replaced, atomically (no temporary or old copy left beside it)
    assert main(["export", str(ckpt), str(out), "--force"]) == 0
    assert snapshot(out) == first and len(loads) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "released", "run"]


def test_a_failed_forced_export_leaves_the_earlier_one_whole(ckpt, tmp_path, monkeypatch):
    import deepseek_moe.checkpoint as cp

    out = tmp_path / "released"
    export_released(ckpt, out)
    first = snapshot(out)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cp.shutil, "copyfile", broken)  # the tokenizer copy fails
    with pytest.raises(CheckpointError, match="disk full"):
        export_released(ckpt, out, force=True)
    assert snapshot(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["released", "run"]
