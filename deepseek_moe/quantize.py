"""``deepseek-moe quantize CKPT OUT --bits 8|4``: a checkpoint converted to weight-only int8 or
int4 (the scheme of ``quant``), tensor by tensor.

The source's tensors are memory-mapped and read one at a time; a shard of the output is written
as soon as it is full, so peak memory is about one output shard (``--shard-size``) plus one
tensor in fp32, never the model. Tensors that are not quantized are stored in bf16. The result
keeps the source's tokenizer and generation files and is written atomically (a temporary folder
renamed into place).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import save
from tqdm.auto import tqdm

from .atomic import fsync_path, normal_mode, write_json
from .checkpoint import (CONFIG_NAME, INDEX_NAME, SAFETENSORS_DTYPES, CheckpointError, check_target,
                         copy_companions, new_checkpoint_dir, plan_shards, shard_file_names, weight_files)
from .memory import Size, parse_size
from .quant import (ALIGN, DEFAULT_GROUP_SIZE, bits_for, check_scheme, group_for, quantize_weight,
                    quantized_shapes, scheme_config, scheme_of)

def quantize_checkpoint(src: Union[str, os.PathLike], out: Union[str, os.PathLike], bits: int,
                        group_size: int = DEFAULT_GROUP_SIZE, *, shard_size: Size = "2GB",
                        force: bool = False, progress: bool = True) -> Path:
    """Write ``src`` (a checkpoint directory in the released layout) quantized to ``bits`` into
    ``out`` and return it. ``out`` must be new or empty (``force``: replace a checkpoint there)."""
    src, out = Path(src), Path(out).absolute()
    check_scheme(bits, group_size)
    limit = parse_size(shard_size, "shard_size")
    try:
        hf = json.loads((src / CONFIG_NAME).read_text())
        if scheme_of(hf) is not None:
            raise ValueError("it is quantized already")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot quantize {src}: {e}") from None
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise CheckpointError(f"refusing to write the quantized checkpoint into its source {src}")
    check_target(out, force)
    files, _ = weight_files(src)
    with contextlib.ExitStack() as stack:
        where, shapes, dtypes = {}, {}, {}
        for f in files:
            fh = stack.enter_context(open(f, "rb"))
            for n, (dtype, shape, begin, end) in _header(f, fh).items():
                where[n], shapes[n], dtypes[n] = (fh, begin, end), shape, dtype
        tied = bool(hf.get("tie_word_embeddings", False))
        plan = {n: _outputs(n, shape, dtypes[n], bits, group_size, tied) for n, shape in shapes.items()}
        sizes = [(n, sum(math.prod(s) * dt.itemsize for s, dt in plan[n].values())) for n in shapes]
        shards = plan_shards(sizes, limit)
        size_of = dict(sizes)
        total = sum(size_of.values())
        with new_checkpoint_dir(out) as tmp:
            weight_map: dict[str, str] = {}
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"int{bits} {out.name}",
                      disable=not progress) as bar:
                for fname, names in zip(shard_file_names(len(shards)), shards):
                    tensors: dict[str, torch.Tensor] = {}
                    for n in names:
                        tensors.update(_convert(n, _read(*where[n], dtypes[n], shapes[n]), bits, group_size, tied))
                        bar.update(size_of[n])
                    _save_aligned(tensors, tmp / fname)
                    del tensors  # this shard's memory goes before the next one is made
                    os.chmod(tmp / fname, normal_mode())
                    fsync_path(tmp / fname)
                    weight_map.update({k: fname for n in names for k in plan[n]})
            if len(shards) > 1:
                write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
            hf.update(torch_dtype="bfloat16", quantization_config=scheme_config(bits, group_size))
            write_json(tmp / CONFIG_NAME, hf)
            copy_companions(src, tmp)
    return out


# Source tensors are read with plain reads, not memory-mapped: mapped pages that were read would
# count in the process's resident memory until the end (the whole source, for a model larger than
# the machine's memory), while read pages are only the kernel's cache, dropped once used.

def _header(path: Path, fh) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, first byte, end byte) of a safetensors file's tensors."""
    try:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        base = 8 + n
        return {k: (v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
                for k, v in header.items() if k != "__metadata__"}
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file: {e}") from None


def _read(fh, begin: int, end: int, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    buf = bytearray(end - begin)
    fh.seek(begin)
    if fh.readinto(buf) != len(buf):
        raise CheckpointError(f"{fh.name}: truncated safetensors file")
    if hasattr(os, "posix_fadvise"):  # done with these pages: leave the cache to others
        os.posix_fadvise(fh.fileno(), begin, end - begin, os.POSIX_FADV_DONTNEED)
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{fh.name}: unsupported tensor dtype {dtype}")
    return torch.frombuffer(buf, dtype=SAFETENSORS_DTYPES[dtype]).view(shape) if buf else \
        torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype])


def _save_aligned(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``save_file``, with the data starting at a multiple of ``ALIGN`` bytes: the header (JSON,
    which safetensors itself pads with spaces) gets more spaces. Tensors whose sizes are multiples
    of ALIGN (every weight of the released shapes) then start aligned, as the int8 kernel needs
    when it reads them straight from the mapped file."""
    blob = save(tensors, metadata={"format": "pt"})
    n = int.from_bytes(blob[:8], "little")
    pad = -(8 + n) % ALIGN
    with open(path, "wb") as f:
        f.write((n + pad).to_bytes(8, "little"))
        f.write(blob[8:8 + n])
        f.write(b" " * pad)
        f.write(memoryview(blob)[8 + n:])


def _outputs(name: str, shape: tuple[int, ...], stored: str, bits: int, group_size: int,
             tied: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What the source tensor ``name`` becomes: output name -> (shape, dtype)."""
    b = bits_for(name, shape, bits, tied)
    if b is not None:
        g = group_for(shape[1], group_size, name) if b == 4 else group_size
        base = name[: -len("weight")]
        return {base + suffix: v for suffix, v in quantized_shapes(shape, b, g).items()}
    floating = stored.startswith(("F", "BF"))
    return {name: (shape, torch.bfloat16 if floating else SAFETENSORS_DTYPES[stored])}


def _convert(name: str, t: torch.Tensor, bits: int, group_size: int, tied: bool) -> dict[str, torch.Tensor]:
    b = bits_for(name, tuple(t.shape), bits, tied)
    if b is not None:
        g = group_for(t.shape[1], group_size, name) if b == 4 else group_size
        base = name[: -len("weight")]
        return {base + suffix: v.contiguous() for suffix, v in quantize_weight(t, b, g).items()}
    return {name: t.to(torch.bfloat16).contiguous() if t.is_floating_point() else t.contiguous()}
