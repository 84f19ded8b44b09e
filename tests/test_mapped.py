"""A model memory-mapped from its safetensors files stays within a resident size: after a decoder
layer that ends over the limit, the files' pages are released from the process, and what the
model computes does not change."""

from __future__ import annotations

import pytest
import torch

from deepseek_moe import mapped
from deepseek_moe.checkpoint import load_pretrained, save_pretrained
from deepseek_moe.model import DeepseekForCausalLM
from deepseek_moe.presets import get_config

pytestmark = pytest.mark.skipif(not mapped.supported(), reason="needs Linux's /proc/self/smaps")


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    cfg = get_config("deepseekmoe-tiny", num_hidden_layers=6, first_k_dense_replace=1, vocab_size=256)
    save_pretrained(DeepseekForCausalLM(cfg), tmp_path, dtype=torch.bfloat16)
    return tmp_path, cfg


def _resident(path) -> int:
    return sum(m.rss for m in mapped.file_mappings([path / "model.safetensors"]))


def test_pages_are_released_after_a_layer_over_the_limit_and_the_logits_do_not_change(ckpt):
    path, cfg = ckpt
    model = load_pretrained(path, max_memory="1KiB")  # too small to copy: per-expert, mapped
    limit = model._resident_limit
    assert limit.limit == int(0.8 * 1024) and len(limit.handles) == cfg.num_hidden_layers
    size = (path / "model.safetensors").stat().st_size
    x = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    assert limit.releases == 1 and _resident(path) < 0.05 * size  # what loading touched: released
    limit.limit = 1 << 62  # no limit: every page the forward touched stays resident
    with torch.no_grad():
        free = model(x).logits
    assert _resident(path) > 0.9 * size and limit.releases == 1
    limit.limit = 0  # always over: released after every layer
    with torch.no_grad():
        held = model(x).logits
    assert limit.releases == 1 + cfg.num_hidden_layers and limit.released > size
    # what is left is what the forward touched after the last layer: the final norm and the head
    assert _resident(path) < 0.05 * size
    assert torch.equal(free, held)
    limit.remove()
    with torch.no_grad():
        assert torch.equal(model(x).logits, free)
    assert limit.releases == 1 + cfg.num_hidden_layers and _resident(path) > 0.9 * size


def test_a_weight_written_in_place_is_never_released(ckpt):
    path, cfg = ckpt
    model = load_pretrained(path, max_memory="1KiB")
    w = model.model.layers[1].mlp.experts[0].up_proj.weight
    with torch.no_grad():
        w.mul_(2)  # a private copy of those pages: releasing them would undo this
    expected = w.detach().clone()
    model._resident_limit.limit = 0
    x = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        model(x)
    assert model._resident_limit.releases > 0
    assert torch.equal(w, expected)
    assert all(m.written > 0 for m in mapped.file_mappings([path / "model.safetensors"]))


def test_a_model_copied_into_memory_has_no_limit(ckpt):
    path, _ = ckpt
    assert not hasattr(load_pretrained(path), "_resident_limit")  # float32, stacked: no mapping
