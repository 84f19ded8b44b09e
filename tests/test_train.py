"""Training: the recipe against hand computations, exact resume, crash safety, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deepseek_moe.checkpoint import load_pretrained
from deepseek_moe.model import DeepseekForCausalLM
from deepseek_moe.presets import get_config
from deepseek_moe.train import TrainConfig, build_optimizer, lr_at, param_groups, train
from deepseek_moe.train_state import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"vocab_size": 512, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
         "moe_intermediate_size": 24, "n_routed_experts": 15, "num_experts_per_tok": 3,
         "n_device_groups": 3, "device_aux_loss_alpha": 0.01}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A few hundred KB of real text: modules of Python's standard library."""
    import argparse, json as _json, pathlib, textwrap as _tw, typing, dataclasses, inspect

    d = tmp_path_factory.mktemp("corpus")
    for mod in (argparse, _json.decoder, _json.encoder, pathlib, _tw, typing, dataclasses, inspect):
        src = Path(mod.__file__).read_text()
        # Split into function-sized documents so that every split gets some.
        for i, chunk in enumerate(src.split("\ndef ")):
            (d / f"{Path(mod.__file__).stem}_{i}.py").write_text(chunk)
    return d


def config(tmp: Path, corpus: Path, **kw) -> TrainConfig:
    base = dict(preset="deepseekmoe-tiny", out=str(tmp / "run"), model_overrides=SMALL,
                data_dir=str(corpus.parent / "data"), sources=(), paths=(str(corpus),),
                vocab_size=512, seq_len=32, batch_size=4, steps=6, ckpt_every=2, keep=2,
                eval_sequences=8, progress=False, lr=3e-3, validation_fraction=0.1,
                test_fraction=0.1)
    base.update(kw)
    return TrainConfig(**base)


def step_rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "lm_loss" in r]


# --- the recipe ---------------------------------------------------------------------------------

def test_schedule_matches_hand_computation():
    peak, warm, total = 1e-3, 10, 100
    assert lr_at(0, peak, warm, total) == pytest.approx(1e-4)
    assert lr_at(4, peak, warm, total) == pytest.approx(5e-4)
    assert lr_at(9, peak, warm, total) == pytest.approx(1e-3)
    assert lr_at(79, peak, warm, total) == pytest.approx(1e-3)
    assert lr_at(80, peak, warm, total) == pytest.approx(3.16e-4)
    assert lr_at(89, peak, warm, total) == pytest.approx(3.16e-4)
    assert lr_at(90, peak, warm, total) == pytest.approx(0.316 * 0.316 * 1e-3)
    assert lr_at(99, peak, warm, total) == pytest.approx(9.9856e-5)


def test_optimizer_groups_and_one_adamw_step_by_hand():
    model = DeepseekForCausalLM(get_config("tiny", **SMALL))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert {names[id(p)].split(".")[-2] for p in no_decay["params"]} <= {
        "input_layernorm", "post_attention_layernorm", "norm"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    cfg = TrainConfig(steps=1, lr=1e-2)
    opt = build_optimizer(model, cfg)
    w = model.lm_head.weight
    n = model.model.norm.weight
    w0, n0 = w.detach().clone(), n.detach().clone()
    g_w, g_n = torch.randn_like(w), torch.randn_like(n)
    w.grad, n.grad = g_w.clone(), g_n.clone()
    opt.step()
    # AdamW, first step: m_hat = g, v_hat = g^2, p -= lr * (wd * p + m_hat / (sqrt(v_hat) + eps))
    want_w = w0 * (1 - 1e-2 * 0.1) - 1e-2 * g_w / (g_w.abs() + 1e-8)
    want_n = n0 - 1e-2 * g_n / (g_n.abs() + 1e-8)
    torch.testing.assert_close(w.detach(), want_w)
    torch.testing.assert_close(n.detach(), want_n)
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert opt.defaults["fused"]  # plain CPU parameters: AdamW's fused kernel


def test_adamw_takes_the_per_operation_loop_where_the_fused_kernel_cannot_serve():
    from deepseek_moe.train import fused_adamw_serves

    assert fused_adamw_serves([torch.zeros(3, requires_grad=True)])
    assert not fused_adamw_serves([torch.zeros(3, device="meta")])
    assert not fused_adamw_serves([torch.zeros(3), torch.zeros(3, dtype=torch.long)])


def test_balance_losses_enter_the_gradient_with_their_alphas():
    """grad(loss) == grad(lm) + a1 * grad(sum expert bal) + a2 * grad(sum device bal)."""
    torch.manual_seed(0)
    cfg = get_config("tiny", **dict(SMALL, aux_loss_alpha=0.3, device_aux_loss_alpha=0.7))
    model = DeepseekForCausalLM(cfg)
    x = torch.randint(0, 512, (2, 16))
    router = model.model.layers[1].mlp.gate.weight

    def grad(f):
        model.zero_grad()
        f(model(x, labels=x)).backward()
        return router.grad.clone()

    total = grad(lambda o: o.loss)
    parts = (grad(lambda o: o.lm_loss) + 0.3 * grad(lambda o: o.expert_balance_loss.sum())
             + 0.7 * grad(lambda o: o.device_balance_loss.sum()))
    torch.testing.assert_close(total, parts, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(total, grad(lambda o: o.lm_loss))


# --- runs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, corpus, dtype):
    full = train(config(tmp_path / "a", corpus, dtype=dtype))
    first = train(config(tmp_path / "b", corpus, stop_after=3, dtype=dtype))
    assert first.step == 3 and first.interrupted is False
    # --dtype auto (fp32 in this suite) on resume: the run keeps the arithmetic it started with
    resumed = train(config(tmp_path / "b", corpus), resume=True)
    assert json.loads((latest_checkpoint(resumed.out / "checkpoints") / "trainer_state.json")
                      .read_text())["dtype"] == dtype
    assert resumed.step == full.step == 6
    a, b = step_rows(full.out), step_rows(resumed.out)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise: exact float equality
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    ma, mb = load_pretrained(full.checkpoint), load_pretrained(resumed.checkpoint)
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert full.val_loss == resumed.val_loss
    # The run logged what the issue asks for, and kept only the last `keep` checkpoints.
    row = a[-1]
    for key in ("loss", "lm_loss", "expert_balance_loss", "device_balance_loss", "lr", "grad_norm",
                "tokens_per_s", "load_cv", "load_max_over_mean", "idle_experts"):
        assert key in row, key
    assert len(row["load_cv"]) == 2
    ckpts = sorted(p.name for p in (full.out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-00000004", "step-00000006"]
    assert (full.out / "loss_curve.png").stat().st_size > 10_000
    assert (full.out / "expert_load.png").stat().st_size > 10_000


def test_sigkill_during_checkpoint_leaves_previous_one_usable(tmp_path, corpus):
    cfg = config(tmp_path, corpus)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.to_json())
    # A child process that dies by SIGKILL in the middle of writing its second checkpoint.
    driver = textwrap.dedent(f"""
        import json, os, signal
        import deepseek_moe.train_state as ts
        from deepseek_moe.train import TrainConfig, train
        calls = []
        real = ts.save_file
        def dying_save_file(tensors, path, *a, **k):
            calls.append(path)
            if len(calls) == 2:  # second checkpoint: model written, optimizer half-way
                with open(path, "wb") as f:
                    f.write(b"partial")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(tensors, path, *a, **k)
        ts.save_file = dying_save_file
        train(TrainConfig(**json.load(open({str(cfg_file)!r}))))
    """)
    r = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == -9, r.stderr[-2000:]
    ckpt = latest_checkpoint(Path(cfg.out) / "checkpoints")
    assert ckpt is not None and ckpt.name == "step-00000002"
    load_pretrained(ckpt)  # loadable
    resumed = train(cfg, resume=True)
    assert resumed.step == 6
    reference = train(config(tmp_path / "ref", corpus))
    assert [r["loss"] for r in step_rows(resumed.out)] == [r["loss"] for r in step_rows(reference.out)]


# --- bad input ------------------------------------------------------------------------------------

def test_tokenizer_larger_than_model_vocab(tmp_path, corpus):
    cfg = config(tmp_path, corpus, model_overrides=dict(SMALL, vocab_size=256))
    with pytest.raises(ValueError, match="tokenizer has 512 tokens but the model's vocab_size is 256"):
        train(cfg)


def test_unwritable_output_directory(tmp_path, corpus):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="not writable"):
        train(config(tmp_path, corpus, out=str(blocker / "run")))
    assert blocker.read_text() == "not a directory"


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = TrainConfig(out=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), sources=(),
                      paths=(str(empty),), steps=1, progress=False)
    with pytest.raises(ValueError, match="(?i)empty|no document"):
        train(cfg)


def test_no_budget_is_an_error():
    with pytest.raises(ValueError, match="budget"):
        TrainConfig().validate()


def test_failed_run_leaves_previous_checkpoints_intact(tmp_path, corpus):
    ok = train(config(tmp_path, corpus, steps=2))
    before = {p.name: p.read_bytes() for p in ok.checkpoint.iterdir()}
    # Same output directory, a tokenizer that does not fit: refused before anything is written.
    with pytest.raises(ValueError, match="vocab_size"):
        train(config(tmp_path, corpus, steps=2, model_overrides=dict(SMALL, vocab_size=256)),
              resume=True)
    assert {p.name: p.read_bytes() for p in ok.checkpoint.iterdir()} == before
    load_pretrained(ok.checkpoint)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus):
    import signal
    import time

    cfg = config(tmp_path, corpus, steps=100000, ckpt_every=100000)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.to_json())
    args = ["-c", "import json, sys; from deepseek_moe.train import TrainConfig, train; "
            f"r = train(TrainConfig(**json.load(open({str(cfg_file)!r})))); "
            "sys.exit(130 if r.interrupted else 0)"]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = Path(cfg.out) / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "saving a checkpoint" in err
    ckpt = latest_checkpoint(Path(cfg.out) / "checkpoints")
    assert ckpt is not None
    step = int(ckpt.name.split("-")[1])
    assert step >= 2
    resumed = train(config(tmp_path, corpus, steps=100000, ckpt_every=100000, stop_after=step + 1),
                    resume=True)
    assert resumed.step == step + 1


@pytest.mark.parametrize("family", ["deepseekmoe", "dense", "hash", "switch", "gshard",
                                    "gshard-x1.5", "dense-x16", "moe-1+1of15", "moe-1+3of31",
                                    "moe-2+6of62", "moe-4+4of60", "moe-1+3of63"])
def test_every_tiny_preset_trains(tmp_path, corpus, family):
    cfg = config(tmp_path, corpus, preset=f"{family}-tiny", steps=1, ckpt_every=1,
                 model_overrides={"vocab_size": 512, "num_hidden_layers": 1}, batch_size=2)
    r = train(cfg)
    assert r.step == 1 and r.val_loss is not None and r.val_loss < 7.0
    assert load_pretrained(r.checkpoint).config.name == f"{family}-tiny"


def test_auto_dtype_probe_changes_nothing_but_the_choice(tmp_path, corpus, monkeypatch):
    """``--dtype auto`` where bf16 matmuls are fast times this model's step in both dtypes and takes
    the faster; the run then equals, bit for bit, a run told that dtype from the start."""
    from deepseek_moe import runtime
    from deepseek_moe.train import _PROBED

    monkeypatch.delenv(runtime.AUTO_DTYPE_ENV, raising=False)
    monkeypatch.setattr(runtime, "fastest_cpu_dtype", lambda: torch.bfloat16)
    _PROBED.clear()
    auto = train(config(tmp_path / "auto", corpus, steps=3, dtype="auto"))
    chosen = json.loads((auto.checkpoint / "trainer_state.json").read_text())["dtype"]
    assert chosen in ("float32", "bfloat16") and len(_PROBED) == 1
    told = train(config(tmp_path / "told", corpus, steps=3, dtype=chosen))
    assert [r["loss"] for r in step_rows(auto.out)] == [r["loss"] for r in step_rows(told.out)]


def test_a_non_finite_loss_stops_the_run_with_where_it_happened(tmp_path, corpus, monkeypatch):
    """From the third micro-batch on the loss is NaN: the run stops with a one-line error naming
    the data position, and the checkpoints written before stay whole."""
    real = DeepseekForCausalLM.forward
    calls = []

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) >= 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DeepseekForCausalLM, "forward", poisoned)
    with pytest.raises(FloatingPointError, match=r"^the loss is nan at data position 12$"):
        train(config(tmp_path, corpus, steps=6, ckpt_every=2, dtype="float32"))
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000002"


def test_compile_on_the_cpu(tmp_path, corpus, monkeypatch, capsys):
    """``--compile`` needs bf16 (grouped_mm under torch.compile); on the CPU it says that the
    eager experts are faster there, then trains the compiled model (here a stand-in: compiling
    takes minutes on two cores; ``tests/test_runtime.py`` compiles the real one)."""
    import deepseek_moe.train as train_mod

    with pytest.raises(ValueError, match="add --dtype bfloat16"):
        train(config(tmp_path / "fp32", corpus, steps=1, dtype="float32", compile=True))
    compiled = []
    monkeypatch.setattr(train_mod, "compile_model", lambda m: compiled.append(m) or m)
    r = train(config(tmp_path / "bf16", corpus, steps=1, dtype="bfloat16", compile=True))
    assert r.step == 1 and len(compiled) == 1
    assert "on the CPU is slower than the default eager experts" in capsys.readouterr().out
