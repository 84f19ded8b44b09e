"""Finding a run's checkpoint and loading it: what ``eval``, ``analyze``, ``generate``, ``export``
and the lm-eval adapter share.

    from deepseek_moe.runs import load_checkpoint
    model, tokenizer, ckpt, run = load_checkpoint("runs/main")

A checkpoint is found from a run directory (its latest checkpoint), a ``checkpoints/`` folder,
or a checkpoint directory itself; the run directory is the one holding ``train_config.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from .checkpoint import CONFIG_NAME, CheckpointError, load_pretrained
from .memory import Size
from .train_config import TRAIN_CONFIG_NAME, TrainConfig

PathLike = Union[str, "os.PathLike[str]"]
TOKENIZER_NAME = "tokenizer.json"


def resolve_checkpoint(path: PathLike) -> tuple[Path, Optional[Path]]:
    """``(checkpoint directory, run directory or None)`` for a run, checkpoints folder or checkpoint."""
    from .train_state import latest_checkpoint

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file, not a checkpoint directory")
    if (p / CONFIG_NAME).is_file():
        run = p.parent.parent
        return p, run if (run / TRAIN_CONFIG_NAME).is_file() else None
    for root, run in ((p / "checkpoints", p), (p, p.parent)):
        if root.is_dir():
            ckpt = latest_checkpoint(root)
            if ckpt is not None:
                return ckpt, run if (run / TRAIN_CONFIG_NAME).is_file() else None
    if (p / TRAIN_CONFIG_NAME).is_file():
        raise CheckpointError(f"{p} is a run directory with no complete checkpoint under "
                              f"{p / 'checkpoints'} yet")
    raise CheckpointError(
        f"{p} is not a checkpoint: no {CONFIG_NAME} (a checkpoint directory holds {CONFIG_NAME} "
        f"and model*.safetensors; a run directory holds {TRAIN_CONFIG_NAME} and checkpoints/)")


def run_train_config(run_dir: Optional[Path]) -> Optional[TrainConfig]:
    """The settings the run recorded (``train_config.json``); None when there is no run directory."""
    if run_dir is None:
        return None
    try:
        return TrainConfig.load(run_dir)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu",
                    tokenizer: Optional[PathLike] = None, dtype: Optional[torch.dtype] = None,
                    max_memory: Optional[Size] = None):
    """``(model in eval mode, tokenizer or None, checkpoint dir, run dir or None)``.

    The tokenizer is ``tokenizer`` when given, else the checkpoint's ``tokenizer.json``, else the
    one the run was trained with; None when none is found (a released checkpoint without one).
    The weights must fit ``max_memory`` (default: what the machine has available).
    """
    from .data import load_tokenizer

    ckpt, run = resolve_checkpoint(path)
    model = load_pretrained(ckpt, device=device, dtype=dtype, max_memory=max_memory)
    model.eval()
    tok_path: Optional[Path] = Path(tokenizer) if tokenizer is not None else None
    if tok_path is None and (ckpt / TOKENIZER_NAME).is_file():
        tok_path = ckpt / TOKENIZER_NAME
    settings = run_train_config(run)
    if tok_path is None and settings is not None and settings.tokenizer:
        tok_path = Path(settings.tokenizer)
    tok = load_tokenizer(tok_path) if tok_path is not None else None
    if tok is not None and tok.get_vocab_size() > model.config.vocab_size:
        raise CheckpointError(f"the tokenizer {tok_path} has {tok.get_vocab_size()} tokens but the "
                              f"model's vocab_size is {model.config.vocab_size}: wrong tokenizer?")
    return model, tok, ckpt, run
