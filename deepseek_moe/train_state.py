"""Training checkpoints: the model in the released layout plus the exact training state.

A checkpoint directory ``step-00000120/`` holds

    config.json, model.safetensors ...   the model, loadable with ``load_pretrained``
    optimizer.safetensors                AdamW moments and step counts, flattened by name
    trainer_state.json                   step, data position, schedule, RNG, metrics; written
                                         last: a directory without it is incomplete

No pickle anywhere: tensors go to safetensors, everything else to JSON. A checkpoint is written
into a hidden temporary directory and renamed into place, then ``latest`` is updated atomically,
so a crash (even SIGKILL) at any moment leaves the previous checkpoint intact and findable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import fsync_path, normal_mode, write_text_atomic
from .checkpoint import CheckpointError, remove_stale, save_pretrained
from .model import DeepseekForCausalLM

STATE_NAME = "trainer_state.json"
OPTIM_NAME = "optimizer.safetensors"
LATEST_NAME = "latest"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# The temporary directories of a checkpoint being written (here and in parallel/checkpoint.py):
# ``.tmp-step-XXXXXXXX`` and names that go on from it.
_TMP_STEP = re.compile(r"\.tmp-step-\d{8}(?:-.*)?")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def remove_orphan_tmp_dirs(ckpt_root: Path) -> None:
    """Remove the ``.tmp-step-*`` directories that a save killed midway left in ``ckpt_root``.
    Call it only where no other process or rank can be writing a checkpoint there."""
    remove_stale(ckpt_root, _TMP_STEP)


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``opt.state_dict()`` into flat tensors (``state.{param}.{key}``) and JSON meta."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of ``optimizer_to_tensors``: a state dict for ``Optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = t
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_checkpoint(
    ckpt_root: Path,
    step: int,
    model: DeepseekForCausalLM,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 3,
    extra_files: Optional[dict[str, str]] = None,
    save_weights: Optional[Callable[[DeepseekForCausalLM, Path], None]] = None,
) -> Path:
    """Write ``ckpt_root/step-XXXXXXXX`` atomically, point ``latest`` at it, keep the last ``keep``.

    ``extra_files`` (name -> text) go into the directory too, e.g. the run's ``tokenizer.json``,
    so that a checkpoint is self-contained for evaluation and generation. ``save_weights(model,
    folder)`` writes the weights instead of ``save_pretrained`` (a LoRA run writes its adapters)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    remove_orphan_tmp_dirs(ckpt_root)
    final = ckpt_root / step_dir_name(step)
    tmp_parent = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=ckpt_root))
    try:
        tmp = tmp_parent / final.name
        (save_weights or save_pretrained)(model, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
            fsync_path(tmp / name)
        tensors, meta = optimizer_to_tensors(optimizer)
        save_file(tensors, str(tmp / OPTIM_NAME))
        os.chmod(tmp / OPTIM_NAME, normal_mode())  # safetensors writes 0o600
        fsync_path(tmp / OPTIM_NAME)
        full_state = dict(state, step=step, optimizer=meta,
                          torch_rng_state=torch.get_rng_state().tolist())
        (tmp / STATE_NAME).write_text(json.dumps(full_state, indent=1))
        fsync_path(tmp / STATE_NAME)
        publish_checkpoint(tmp, ckpt_root, step, keep)
    finally:
        shutil.rmtree(tmp_parent, ignore_errors=True)
    return final


def publish_checkpoint(tmp_dir: Path, ckpt_root: Path, step: int, keep: int) -> Path:
    """Put the complete, fsynced checkpoint ``tmp_dir`` in place as ``ckpt_root/step-XXXXXXXX``,
    point ``latest`` at it and keep the last ``keep`` complete checkpoints (all if ``keep <= 0``).

    In this order, so that a crash at any moment leaves a complete checkpoint that ``latest`` or
    ``latest_checkpoint`` finds: the rename (replacing a checkpoint of the same step) and the
    fsync of ``ckpt_root`` that makes it durable, then ``latest`` (written atomically), then the
    pruning of older checkpoints."""
    final = ckpt_root / step_dir_name(step)
    if final.exists():  # a checkpoint of the same step (e.g. resumed, then saved again)
        shutil.rmtree(final)
    os.rename(tmp_dir, final)
    fsync_path(ckpt_root)
    write_text_atomic(ckpt_root / LATEST_NAME, final.name + "\n")
    for old in complete_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories under ``ckpt_root``, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir()
             if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names if it is complete, else the newest complete one."""
    pointer = ckpt_root / LATEST_NAME
    if pointer.is_file():
        cand = ckpt_root / pointer.read_text().strip()
        if _STEP_DIR.match(cand.name) and (cand / STATE_NAME).is_file():
            return cand
    done = complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint, with a clear error."""
    try:
        return json.loads((ckpt / STATE_NAME).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt / STATE_NAME}: unreadable training state ({e})") from e


def load_training_state(ckpt: Path) -> tuple[dict[str, Any], dict]:
    """(trainer state, optimizer state dict) of a checkpoint, with clear errors."""
    state = read_trainer_state(ckpt)
    try:
        tensors = load_file(str(ckpt / OPTIM_NAME))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{ckpt / OPTIM_NAME}: unreadable optimizer state ({e})") from e
    return state, optimizer_from_tensors(tensors, state["optimizer"])


def checkpoint_problem(ckpt: Path) -> Optional[str]:
    """Why ``ckpt`` cannot be resumed from, or None when it looks whole: its trainer state parses
    with the fields a resume reads, its config parses, and every safetensors file it names opens
    (a truncated or overwritten file fails here, before any weight is loaded)."""
    from safetensors import safe_open

    try:
        state = json.loads((ckpt / STATE_NAME).read_text())
    except (OSError, ValueError) as e:
        return f"{STATE_NAME} is unreadable ({e})"
    missing = [k for k in ("step", "position", "total_steps", "torch_rng_state") if k not in state]
    if missing:
        return f"{STATE_NAME} lacks {', '.join(missing)}"
    try:
        json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"config.json is unreadable ({e})"
    files = sorted(ckpt.glob("model*.safetensors"))
    if (ckpt / "adapter_config.json").is_file():  # a LoRA run's: adapters, no model weights
        files = [ckpt / "adapter_model.safetensors", ckpt / OPTIM_NAME]
    elif not (ckpt / "dcp").is_dir():
        if not files:
            return "it holds no model*.safetensors"
        files.append(ckpt / OPTIM_NAME)
    for f in files:
        try:
            with safe_open(str(f), "pt") as g:
                g.keys()
        except (OSError, SafetensorError) as e:
            return f"{f.name} is unreadable ({e})"
    return None


def pick_checkpoint(ckpt_root: Path) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """The newest complete checkpoint that ``checkpoint_problem`` finds whole, and the newer ones
    it skipped with the reason for each."""
    skipped: list[tuple[Path, str]] = []
    for ckpt in reversed(complete_checkpoints(ckpt_root)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt, skipped
        skipped.append((ckpt, problem))
    return None, skipped
