"""Sharded training checkpoints with torch.distributed.checkpoint (DCP).

A distributed run's ``step-XXXXXXXX/`` holds

    dcp/                           model and AdamW state as each rank holds them (DCP shards)
    config.json, model*.safetensors  the released layout (gathered on rank 0), so eval, analyze
                                   and generate read a checkpoint of any layout directly
    tokenizer.json, trainer_state.json  as in a single-process checkpoint (state written last)

DCP stores each tensor with its global shape and the slice each rank wrote, so a checkpoint
saved under one layout loads under another (2 ranks -> 1, 1 -> 4, with or without FSDP): every
rank asks for the slices it now holds. State dicts are keyed by parameter name
(``torch.distributed.checkpoint.state_dict``), never by position.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from ..atomic import fsync_path
from ..checkpoint import CheckpointError, load_pretrained, save_pretrained
from ..config import DeepseekMoEConfig
from ..model import DeepseekForCausalLM
from ..train_state import STATE_NAME, publish_checkpoint, remove_orphan_tmp_dirs, step_dir_name

DCP_DIR = "dcp"


def is_distributed_checkpoint(ckpt: Path) -> bool:
    return (ckpt / DCP_DIR / ".metadata").is_file()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_model(model: nn.Module, config: DeepseekMoEConfig) -> Optional[DeepseekForCausalLM]:
    """The whole model as one plain module on rank 0 (None elsewhere); collective."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() != 0:
        return None
    with torch.device("meta"):
        m = DeepseekForCausalLM(config)
    m.load_state_dict(sd, assign=True)
    return m


def save_distributed_checkpoint(ckpt_root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                                config: DeepseekMoEConfig, state: dict[str, Any], keep: int = 3,
                                extra_files: Optional[dict[str, str]] = None) -> Path:
    """Every rank calls this. Written under a hidden name and renamed by rank 0 once every shard
    is on disk, then ``latest`` moves: an interrupted save leaves the previous checkpoint whole."""
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp-{final.name}"
    if _rank() == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        # Every rank finished the previous save (its closing barrier) and none starts this one
        # before the barrier below: no temporary directory is in use, so all are orphans.
        remove_orphan_tmp_dirs(ckpt_root)
        tmp.mkdir()
    _barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / DCP_DIR))
    whole = full_model(model, config)
    if whole is not None:
        released = ckpt_root / f".tmp-{final.name}-released"
        save_pretrained(whole, released)
        for f in released.iterdir():
            os.replace(f, tmp / f.name)
        released.rmdir()
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        full_state = dict(state, step=step, torch_rng_state=torch.get_rng_state().tolist(),
                          layout={"world": dist.get_world_size() if dist.is_initialized() else 1})
        (tmp / STATE_NAME).write_text(json.dumps(full_state, indent=1))
        fsync_path(tmp / STATE_NAME)
        publish_checkpoint(tmp, ckpt_root, step, keep)
    _barrier()
    return final


def load_distributed_state(ckpt: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Load a DCP checkpoint into ``model`` (and ``optimizer``) of whatever layout they have now
    (a plain single-process model too)."""
    path = ckpt / DCP_DIR
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{ckpt} has no distributed checkpoint ({DCP_DIR}/.metadata missing)")
    if optimizer is None:
        msd = get_model_state_dict(model)
        state: dict[str, Any] = {"model": msd}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # DCP raises several kinds (CheckpointException, RuntimeError, ...)
        raise CheckpointError(f"{path}: cannot load into this model ({type(e).__name__}: {e})") from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, full_model: nn.Module,
                    full_optimizer: torch.optim.Optimizer) -> None:
    """Copy a plain (single-process) model and optimizer into a parallel one: every rank keeps
    its slice. Used to resume a single-process checkpoint under a distributed layout."""
    fmsd, fosd = get_state_dict(full_model, full_optimizer)
    set_state_dict(model, optimizer, model_state_dict=fmsd, optim_state_dict=fosd,
                   options=StateDictOptions(full_state_dict=True))


# The files of an exported checkpoint: the only ones ``export --force`` may replace.
_RELEASED_FILE = re.compile(r"config\.json|model\.safetensors|model-\d+-of-\d+\.safetensors|"
                            r"model\.safetensors\.index\.json|tokenizer\.json|tokenizer_config\.json|"
                            r"generation_config\.json|chat_template\.jinja")


def check_export_target(ckpt: Path, out: Path, force: bool) -> None:
    """Refuse an export that would destroy what it did not create: ``out`` being, inside or
    holding the source checkpoint, a non-empty ``out`` without ``force``, and, even with
    ``force``, an ``out`` holding anything besides the released layout's files."""
    src, dst = Path(ckpt).resolve(), Path(out).resolve()
    if dst == src:
        raise CheckpointError(f"refusing to export {ckpt} onto itself: choose a new OUT")
    if src in dst.parents:
        raise CheckpointError(f"refusing to export into {out}: it is inside the source "
                              f"checkpoint {ckpt}")
    if dst in src.parents:
        raise CheckpointError(f"refusing to export onto {out}: it contains the source "
                              f"checkpoint {ckpt}")
    if Path(out).is_symlink():
        raise CheckpointError(f"refusing to replace {out}: it is a symbolic link")
    if not dst.exists():
        return
    if not dst.is_dir():
        raise CheckpointError(f"refusing to overwrite {out}: it exists and is not a directory")
    entries = sorted(dst.iterdir())
    if not entries:
        return
    names = [e.name + ("/" if e.is_dir() else "") for e in entries]
    held = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    foreign = [e for e in entries if e.is_symlink() or not e.is_file()
               or not _RELEASED_FILE.fullmatch(e.name)]
    if foreign:
        raise CheckpointError(
            f"refusing to overwrite {out}: it is not an exported checkpoint (it holds {held}); "
            f"export never replaces a training checkpoint, a run or any other folder, even "
            f"with --force")
    if not force:
        raise CheckpointError(f"refusing to overwrite {out}: it holds {held} (pass --force to "
                              f"replace an exported checkpoint)")


def model_of(ckpt: Path) -> DeepseekForCausalLM:
    """The model of a checkpoint of any layout, in one process: from ``dcp/`` when present, else
    from the checkpoint's own safetensors."""
    if not is_distributed_checkpoint(ckpt):
        return load_pretrained(ckpt)
    model = DeepseekForCausalLM(DeepseekMoEConfig.load(ckpt / "config.json"))
    load_distributed_state(ckpt, model, None)
    return model


def export_released(ckpt: Path, out: Path, force: bool = False) -> Path:
    """Write the released single-directory layout of a checkpoint of any layout (one process):
    the model comes from ``dcp/`` when present, else from the checkpoint's own safetensors;
    its ``tokenizer.json`` goes in with the same atomic write.

    ``out`` must be new or empty; ``force`` replaces an earlier export (a directory holding only
    released-layout files). The source checkpoint itself, a folder inside or around it, a
    training checkpoint, a run or any other folder is always refused, before the model loads."""
    ckpt, out = Path(ckpt), Path(out)
    check_export_target(ckpt, out, force)
    model = model_of(ckpt)
    tokenizer = ckpt / "tokenizer.json"
    save_pretrained(model, out,
                    extra_files={"tokenizer.json": tokenizer} if tokenizer.is_file() else None)
    return out
