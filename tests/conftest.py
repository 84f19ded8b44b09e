from pathlib import Path

import pytest
import torch

from deepseek_moe.cli import main

SMALL = {"vocab_size": 512, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
         "moe_intermediate_size": 24, "n_routed_experts": 15, "num_experts_per_tok": 3}


@pytest.fixture(scope="session", autouse=True)
def _own_cache_home(tmp_path_factory):
    """No test writes into the user's cache: the default data folder is a temporary one."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session", autouse=True)
def _fp32_by_default():
    """``--dtype auto`` means fp32 in the suite, on every CPU, so that results do not depend on the
    machine's bf16 speed (tests of bf16 and of the measurement ask for them explicitly)."""
    import os

    from deepseek_moe.runtime import AUTO_DTYPE_ENV

    old = os.environ.get(AUTO_DTYPE_ENV)
    os.environ[AUTO_DTYPE_ENV] = "float32"
    yield
    if old is None:
        os.environ.pop(AUTO_DTYPE_ENV, None)
    else:
        os.environ[AUTO_DTYPE_ENV] = old


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- a trained tiny run with two domains ----------------------------------------------------------------
@pytest.fixture(scope="session")
def run(tmp_path_factory) -> Path:
    """A 4-step run of a small DeepSeekMoE on Python code and prose (pydoc topics)."""
    import argparse as _argparse
    import dataclasses as _dataclasses
    import inspect as _inspect
    import json as _json
    import re
    import textwrap as _tw

    from pydoc_data.topics import topics

    tmp = tmp_path_factory.mktemp("evalrun")
    code, prose = tmp / "code", tmp / "prose"
    code.mkdir()
    prose.mkdir()
    for mod in (_argparse, _json.decoder, _json.encoder, _tw, _dataclasses, _inspect):
        # one document per function or method
        for i, chunk in enumerate(re.split(r"\n(?=def |class |    def )", Path(mod.__file__).read_text())):
            (code / f"{mod.__name__}_{i}.py").write_text(chunk)
    for name, text in topics.items():
        (prose / f"{name}.txt").write_text(text)
    args = ["train", "--out", str(tmp / "run"), "--data-dir", str(tmp / "data"), "--sources",
            "--text", f"code={code}", "--text", f"prose={prose}", "--vocab-size", "512",
            "--steps", "4", "--validation-fraction", "0.1", "--seq-len", "64", "--batch-size", "4",
            "--no-progress"]
    for k, v in SMALL.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    return tmp / "run"
