"""The run settings: one dataclass, a command line generated from it, old runs' JSON."""

import dataclasses
import json
import re

import pytest

from deepseek_moe.cli import build_parser
from deepseek_moe.data.corpus import TEST_FRACTION
from deepseek_moe.reproduce import Settings
from deepseek_moe.train_config import LEGACY_SOURCES, TrainConfig


def help_of(command: str, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping inside a default
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return sub.format_help()


def shown_default(f: dataclasses.Field) -> str:
    if f.metadata.get("shown"):
        return f.metadata["shown"].replace("%%", "%")
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def test_train_help_lists_every_field_with_its_default(monkeypatch):
    text = help_of("train", monkeypatch)
    for f in dataclasses.fields(TrainConfig):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        blocks = [" ".join(b.split()) for b in re.split(r"\n(?=  -)|\n\n", text)]  # one per option
        block = next((b for b in blocks if re.match(re.escape(flag) + r"\b", b)), None)
        assert block, f"train --help has no {flag} for TrainConfig.{f.name}"
        assert block.endswith(f"(default: {shown_default(f)})"), (f.name, block)


def test_parsed_defaults_are_the_dataclass_defaults():
    """`train` with only a budget gives TrainConfig's own defaults: nothing restated to drift."""
    args = build_parser().parse_args(["train", "--steps", "5"])
    from deepseek_moe.cli import _train_config

    assert _train_config(args) == TrainConfig(steps=5)
    args = build_parser().parse_args(["main"])
    cfg = _train_config(args)
    assert cfg.minutes == 3.0 and cfg == TrainConfig(minutes=3.0, out=None)


def test_every_option_reaches_the_config():
    argv = ["train", "--preset", "dense-tiny", "--set", "num_hidden_layers=2", "--set", "name=x",
            "--tokens", "1000", "--minutes", "2", "--data-dir", "d", "--sources", "stdlib",
            "--text", "a.txt", "--text", "b", "--tokenizer", "t.json", "--vocab-size", "300",
            "--validation-fraction", "0.1", "--test-fraction", "0.2", "--seq-len", "32",
            "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-3", "--warmup-steps", "3",
            "--weight-decay", "0.05", "--betas", "0.8", "0.9", "--eps", "1e-6", "--grad-clip", "0.5",
            "--seed", "7", "--out", "o", "--stop-after", "9", "--ckpt-every", "11", "--keep", "2",
            "--eval-every", "5", "--eval-sequences", "8", "--device", "cpu", "--dtype", "float32",
            "--bf16", "--compile", "--no-progress", "--expert-parallel", "2", "--fsdp"]
    from deepseek_moe.cli import _train_config

    cfg = _train_config(build_parser().parse_args(argv))
    assert cfg == TrainConfig(
        preset="dense-tiny", model_overrides={"num_hidden_layers": 2, "name": "x"}, tokens=1000,
        data_dir="d", sources=("stdlib",), paths=("a.txt", "b"), tokenizer="t.json", vocab_size=300,
        validation_fraction=0.1, test_fraction=0.2, seq_len=32, batch_size=4, grad_accum=2, lr=1e-3,
        warmup_steps=3, weight_decay=0.05, betas=(0.8, 0.9), eps=1e-6, grad_clip=0.5, seed=7, out="o",
        stop_after=9, ckpt_every=11, keep=2, eval_every=5, eval_sequences=8, device="cpu",
        dtype="float32", bf16_autocast=True, compile=True, progress=False, expert_parallel=2, fsdp=True)
    assert cfg.minutes is None  # tokens win over minutes, as the run uses them


def test_test_fraction_follows_validation_unless_given():
    assert TrainConfig(validation_fraction=0.1).test_fraction == 0.1
    assert TrainConfig(validation_fraction=0.1, test_fraction=0.02).test_fraction == 0.02


def test_old_run_json_loads(tmp_path):
    """A train_config.json of an earlier version: unknown keys ignored; missing sources and test
    fraction are the ones runs of that time used."""
    old = {"preset": "deepseekmoe-tiny", "out": "runs/x", "steps": 10, "seq_len": 64,
           "validation_fraction": 0.1, "removed_option": 1}
    (tmp_path / "train_config.json").write_text(json.dumps(old))
    cfg = TrainConfig.load(tmp_path)
    assert cfg.seq_len == 64 and cfg.sources == LEGACY_SOURCES and cfg.test_fraction == TEST_FRACTION
    written = TrainConfig(steps=3, seq_len=32)
    (tmp_path / "train_config.json").write_text(written.to_json())
    assert TrainConfig.load(tmp_path) == written
    (tmp_path / "train_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="train_config.json: unreadable"):
        TrainConfig.load(tmp_path)


def test_reproduce_settings_are_a_train_config():
    s = Settings(seq_len=32, validation_fraction=0.1, bf16_autocast=True)
    from pathlib import Path

    cfg = s.run_config(Path("out/runs/gshard-seed1"), "gshard", 1)
    assert isinstance(cfg, TrainConfig) and type(cfg) is TrainConfig
    assert (cfg.preset, cfg.seed, cfg.seq_len, cfg.dtype, cfg.test_fraction) == (
        "gshard-tiny", 1, 32, "bfloat16", 0.1)
    assert cfg.data_dir == str(Path("out/data")) and cfg.tokens == s.tokens
