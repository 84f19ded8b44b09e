"""A random checkpoint laid out like the released deepseek-moe-16b hub snapshot, written streamed.

What a test of the released layout at full size needs without downloading 33 GB: the same files
as the hub snapshot of deepseek-moe-16b-base / -chat (``config.json`` with ``auto_map``, bf16
safetensors shards ``model-0000K-of-0000N.safetensors`` with ``model.safetensors.index.json``,
``generation_config.json``, stub remote-code files, ``tokenizer.json`` and
``tokenizer_config.json``), with weights drawn from N(0, initializer_range^2) (the paper's init
std 0.006) and norms at 1.

Streamed: the shard plan comes from the config's shapes alone (a model on the meta device), then
one tensor at a time is generated and each shard is written as soon as it is full, so the peak
memory is about one shard plus one tensor, never the whole model. Deterministic for a seed: each
tensor has its own generator seeded from ``(seed, name)``, so its values do not depend on the
sharding. Atomic: everything goes to a temporary sibling directory that is renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Iterator, Union

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, models, processors
from tqdm import tqdm

from .atomic import fsync_path, normal_mode, write_json
from .checkpoint import (
    CONFIG_NAME, INDEX_NAME, CheckpointError, check_target, hf_state_dict, meta_model, new_checkpoint_dir,
    plan_shards, shard_file_names,
)
from .config import DeepseekMoEConfig
from .data.tokenizer import RELEASED_BOS as BOS_TOKEN
from .data.tokenizer import RELEASED_CHAT_TEMPLATE as CHAT_TEMPLATE
from .data.tokenizer import RELEASED_EOS as EOS_TOKEN
from .data.tokenizer import save_tokenizer, train_tokenizer
from .memory import parse_size
from .presets import get_config

DEFAULT_PRESET = "deepseekmoe-16b"
DEFAULT_SHARD_BYTES = 5 * 10**9  # the hub's default max_shard_size ("5GB"): 7 shards for 16B
AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekConfig",
    "AutoModel": "modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
}
REMOTE_CODE_FILES = ("configuration_deepseek.py", "modeling_deepseek.py")
_REMOTE_CODE_STUB = '''"""Placeholder for the remote-code file {name} of the deepseek-moe-16b hub snapshot.

Written by deepseek_moe.random_checkpoint so that the directory has the files of the release.
deepseek_moe never imports or runs remote code; nor should anything else run this file.
"""

raise ImportError("{name} is a placeholder, not the released remote code")
'''
_BPE_VOCAB = 8192  # trained BPE tokens; the ids above them up to bos/eos are unreachable fillers
_BPE_TEXT_BYTES = 2_000_000


def write_random_checkpoint(
    out: Union[str, os.PathLike], config: Union[DeepseekMoEConfig, str] = DEFAULT_PRESET, *,
    seed: int = 0, shard_bytes: Union[int, str] = DEFAULT_SHARD_BYTES,
    dtype: torch.dtype = torch.bfloat16, progress: bool = True, force: bool = False,
    chat: bool = False,
) -> Path:
    """Write a random checkpoint of ``config`` (a config or a preset name) to ``out`` in the
    layout of the deepseek-moe-16b hub snapshot and return its path.

    ``shard_bytes`` caps a shard (``"5GB"``, ``"200MiB"`` or bytes); one shard is written as
    ``model.safetensors`` without an index, as the hub does. ``chat`` adds the released chat
    template to ``tokenizer_config.json`` (the -chat snapshot). A config without bos/eos ids
    gets the last two ids of its vocabulary. A non-empty ``out`` is refused unless ``force``,
    and even then only a checkpoint (a directory with ``config.json``) is replaced.
    """
    cfg = get_config(config) if isinstance(config, str) else config
    cfg = _with_special_ids(cfg)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating type, got {dtype}")
    limit = parse_size(shard_bytes, "shard_bytes")
    out = Path(out).absolute()
    check_target(out, force)
    entries = [(name, tuple(t.shape)) for name, t in hf_state_dict(meta_model(cfg)).items()]
    shapes = dict(entries)
    shards = [[(n, shapes[n]) for n in names] for names in
              plan_shards([(n, math.prod(shape) * dtype.itemsize) for n, shape in entries], limit)]
    total = sum(math.prod(shape) for _, shape in entries) * dtype.itemsize
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total + 64 * 2**20:
        raise CheckpointError(f"a random checkpoint of {cfg.name or 'this config'} needs "
                              f"{total / 1e9:.1f} GB on {out.parent}, which has "
                              f"{free / 1e9:.1f} GB free")
    with new_checkpoint_dir(out) as tmp:
        _write_tokenizer(tmp, cfg, chat)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"random {out.name}",
                  disable=not progress) as bar:
            weight_map = _write_shards(tmp, cfg, shards, seed, dtype, bar)
        if len(shards) > 1:
            write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total},
                                           "weight_map": weight_map})
        hf = cfg.to_hf_dict()
        hf.update(auto_map=AUTO_MAP, torch_dtype=str(dtype).removeprefix("torch."),
                  rope_scaling=None, attention_dropout=0.0)
        write_json(tmp / CONFIG_NAME, hf)
        write_json(tmp / "generation_config.json", {
            "_from_model_config": True, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id})
        for name in REMOTE_CODE_FILES:
            (tmp / name).write_text(_REMOTE_CODE_STUB.format(name=name))
            fsync_path(tmp / name)
    return out


def _with_special_ids(cfg: DeepseekMoEConfig) -> DeepseekMoEConfig:
    bos, eos = cfg.bos_token_id, cfg.eos_token_id
    if bos is None and eos is None:
        return cfg.replace(bos_token_id=cfg.vocab_size - 2, eos_token_id=cfg.vocab_size - 1)
    if bos is None or eos is None:
        raise ValueError("set both bos_token_id and eos_token_id in the config, or neither")
    if bos == eos or not 258 <= min(bos, eos) <= max(bos, eos) < cfg.vocab_size:
        raise ValueError(f"bos_token_id {bos} and eos_token_id {eos} must be distinct ids in "
                         f"[258, vocab_size {cfg.vocab_size}): the BPE's 256 bytes and a merge "
                         f"come first")
    return cfg


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def random_tensor(name: str, shape: tuple[int, ...], std: float, seed: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The tensor ``name``: norm weights 1, other vectors (biases) 0, matrices N(0, std^2) from
    a generator seeded by ``(seed, name)``, drawn in place in ``dtype`` (no float32 copy)."""
    if len(shape) == 1:
        return (torch.ones if name.endswith("norm.weight") else torch.zeros)(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=gen)


def _write_shards(out: Path, cfg: DeepseekMoEConfig,
                  shards: list[list[tuple[str, tuple[int, ...]]]], seed: int,
                  dtype: torch.dtype, bar: tqdm) -> dict[str, str]:
    files = shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    for fname, shard in zip(files, shards):
        tensors = {}
        for name, shape in shard:
            tensors[name] = random_tensor(name, shape, cfg.initializer_range, seed, dtype)
            bar.update(tensors[name].nbytes)
        save_file(tensors, out / fname, metadata={"format": "pt"})
        del tensors  # the shard's memory goes before the next one is drawn
        os.chmod(out / fname, normal_mode())  # safetensors writes 0o600 (a temporary file)
        fsync_path(out / fname)
        weight_map.update({name: fname for name, _ in shard})
    return weight_map


# --- tokenizer ---------------------------------------------------------------------------------
def _stdlib_text(max_bytes: int) -> Iterator[str]:
    """The running interpreter's top-level standard-library modules, in name order."""
    seen = 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if seen >= max_bytes:
            return
        text = f.read_text(encoding="utf-8", errors="replace")
        seen += len(text)
        yield text


def build_tokenizer(cfg: DeepseekMoEConfig) -> Tokenizer:
    """A byte-level BPE whose special tokens sit where the config says: ``BOS_TOKEN`` at
    ``bos_token_id`` and ``EOS_TOKEN`` at ``eos_token_id`` (100000 and 100001 in the release).

    Up to ``_BPE_VOCAB`` tokens are trained on standard-library source; the ids between them and
    the special tokens are filler tokens no merge produces, so the vocabulary ends at the larger
    special id (never beyond the config's vocab_size). A post-processor prepends the bos token,
    as the release's tokenizer does (``add_bos_token``).
    """
    special = {cfg.bos_token_id: BOS_TOKEN, cfg.eos_token_id: EOS_TOKEN}
    trained = train_tokenizer(_stdlib_text(_BPE_TEXT_BYTES), min(_BPE_VOCAB, min(special)),
                              max_bytes=None, specials=())
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for i in range(len(vocab), max(special) + 1):
        vocab[special.get(i, f"<｜unused▁{i}｜>")] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in model["merges"]]))
    tok.pre_tokenizer, tok.decoder = trained.pre_tokenizer, trained.decoder
    tok.add_special_tokens([AddedToken(t, normalized=False) for _, t in sorted(special.items())])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, cfg.bos_token_id)])
    return tok


def _write_tokenizer(out: Path, cfg: DeepseekMoEConfig, chat: bool) -> None:
    save_tokenizer(build_tokenizer(cfg), out / "tokenizer.json")
    fsync_path(out / "tokenizer.json")

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False,
                "normalized": True, "rstrip": False, "single_word": False}

    tok_cfg = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": added(BOS_TOKEN),
        "clean_up_tokenization_spaces": False, "eos_token": added(EOS_TOKEN), "legacy": True,
        "model_max_length": cfg.max_position_embeddings, "pad_token": None,
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizerFast", "unk_token": None,
    }
    if chat:
        tok_cfg["chat_template"] = CHAT_TEMPLATE
    write_json(out / "tokenizer_config.json", tok_cfg)


__all__ = ["BOS_TOKEN", "CHAT_TEMPLATE", "DEFAULT_PRESET", "EOS_TOKEN", "build_tokenizer",
           "random_tensor", "write_random_checkpoint"]
