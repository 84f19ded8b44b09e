"""The training loop with the paper's recipe (SPEC section 4), checkpoints and exact resume.

Recipe: AdamW (beta 0.9 / 0.95, weight decay 0.1 on matrices), linear warmup, then the learning
rate times 0.316 at 80% and again at 90% of the steps; gradient clipping at 1.0; init std 0.006;
the balance losses weighted by the config's alphas are part of the model's loss.

Exact resume: the data order is a pure function of (seed, sequences consumed); the checkpoint
holds the weights, AdamW's moments, the step, the data position and the RNG state, so a resumed
run reproduces the uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import CheckpointError, load_pretrained
from .model import DeepseekForCausalLM
from .presets import get_config
from .train_state import (
    latest_checkpoint,
    load_training_state,
    save_training_checkpoint,
    write_text_atomic,
)

DECAY_MULTIPLIER = 0.316
DECAY_AT = (0.8, 0.9)


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``train_config.json`` in the output directory."""

    preset: str = "deepseekmoe-tiny"
    out: str = "runs/tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # data
    data_dir: Optional[str] = None  # default: ~/.cache/deepseek-moe/data
    sources: tuple[str, ...] = ("stdlib", "site-packages", "shakespeare", "debian")
    paths: tuple[str, ...] = ()
    tokenizer: Optional[str] = None  # an existing tokenizer.json; else one is trained
    vocab_size: Optional[int] = None  # BPE size to train (default: the model's vocab_size)
    validation_fraction: float = 0.005  # of documents, chosen by content hash
    test_fraction: float = 0.005
    # batch and budget (exactly one of steps / tokens / minutes; steps wins)
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    steps: Optional[int] = None
    tokens: Optional[int] = None
    minutes: Optional[float] = None
    stop_after: Optional[int] = None  # stop this invocation at this step (schedule unchanged)
    # the recipe
    lr: float = 1.08e-3
    warmup_steps: Optional[int] = None  # default min(2000, 10% of steps)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    # bookkeeping
    ckpt_every: int = 200
    keep: int = 3
    eval_every: int = 0  # 0: only at the end
    eval_sequences: int = 64
    device: str = "cpu"
    bf16_autocast: bool = False  # on GPUs; CPU training stays in fp32 (5x faster here)
    progress: bool = True

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "ckpt_every", "eval_sequences"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.steps is None and self.tokens is None and self.minutes is None:
            raise ValueError("give a budget: steps, tokens or minutes")
        for name in ("steps", "tokens", "minutes", "warmup_steps", "stop_after"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


# --- the recipe -----------------------------------------------------------------------------------
def default_warmup(total_steps: int) -> int:
    """The paper warms up over 2K of 25K+ steps; short runs warm up over 10% of their steps."""
    return max(1, min(2000, total_steps // 10))


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``peak`` over
    ``warmup`` steps, then x0.316 from 80% of ``total`` and x0.316 again from 90%."""
    if step < warmup:
        return peak * (step + 1) / warmup
    lr = peak
    for frac in DECAY_AT:
        if step >= frac * total:
            lr *= DECAY_MULTIPLIER
    return lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear, expert, router and embedding weights), none on norm
    weights and biases: the usual split for AdamW in LLM training."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
        foreach=False,  # the same kernel path on every run keeps resume bit-exact
    )


# --- expert-load statistics -------------------------------------------------------------------
def load_stats(tokens_per_expert_LE: torch.Tensor) -> dict[str, list[float]]:
    """Per MoE layer: coefficient of variation, max/mean of the token counts, idle experts."""
    if tokens_per_expert_LE.numel() == 0:
        return {"load_cv": [], "load_max_over_mean": [], "idle_experts": []}
    load = tokens_per_expert_LE.double()
    mean = load.mean(-1)
    return {
        "load_cv": (load.std(-1, unbiased=False) / mean).tolist(),
        "load_max_over_mean": (load.max(-1).values / mean).tolist(),
        "idle_experts": (load == 0).sum(-1).tolist(),
    }


# --- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_loss(model: DeepseekForCausalLM, dataset, n_sequences: int, batch_size: int,
                  device: torch.device) -> float:
    """Mean next-token loss over ``n_sequences`` sequences spread evenly over ``dataset`` (the
    split is stored document by document, so its first sequences would all be one domain)."""
    n = min(n_sequences, len(dataset))
    if n == 0:
        raise ValueError("the validation split holds no complete sequence; use a larger corpus "
                         "or a shorter seq_len")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    picks = [i * len(dataset) // n for i in range(n)]
    for start in range(0, n, batch_size):
        x = torch.stack([dataset[i] for i in picks[start:start + batch_size]]).to(device)
        out = model(x, labels=x)
        k = x.shape[0] * (x.shape[1] - 1)
        total += out.lm_loss.item() * k
        count += k
    model.train(was_training)
    return total / count


# --- the run --------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    out: Path
    step: int
    total_steps: int
    tokens: int
    val_loss: Optional[float]
    checkpoint: Optional[Path]
    interrupted: bool
    seconds: float
    plots: list[Path] = field(default_factory=list)


class _StopFlag:
    """Ctrl-C sets a flag; the loop finishes its step, saves a checkpoint and exits cleanly."""

    def __init__(self) -> None:
        self.stop = False
        self._old = None

    def __enter__(self) -> "_StopFlag":
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop:  # a second Ctrl-C aborts at once
            raise KeyboardInterrupt
        self.stop = True
        print("\ninterrupt: finishing this step, saving a checkpoint ...", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output directory {out} is not writable: {e}") from None


def _read_metrics(path: Path, upto_step: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # Per-step rows up to the checkpoint; end-of-invocation summaries are written again.
    return [r for r in rows if r.get("step", 0) <= upto_step and not r.get("final")]


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train ``cfg.preset`` on the prepared corpus; returns where everything was written."""
    from .data import PackedSequences, SequenceSampler, batch, prepare_data

    cfg.validate()
    out = Path(cfg.out)
    _check_writable(out)
    ckpt_root = out / "checkpoints"
    device = torch.device(cfg.device)
    t_start = time.perf_counter()

    # ---- model config and data ----
    model_cfg = get_config(cfg.preset, **cfg.model_overrides)
    if model_cfg.max_position_embeddings < cfg.seq_len:
        model_cfg = model_cfg.replace(max_position_embeddings=cfg.seq_len)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else Path.home() / ".cache" / "deepseek-moe" / "data"
    tokenizer, cache = prepare_data(
        data_dir, vocab_size=cfg.vocab_size or model_cfg.vocab_size, sources=cfg.sources,
        paths=cfg.paths, tokenizer_path=Path(cfg.tokenizer) if cfg.tokenizer else None,
        progress=cfg.progress, validation_fraction=cfg.validation_fraction,
        test_fraction=cfg.test_fraction,
    )
    vocab = tokenizer.get_vocab_size()
    if vocab > model_cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {vocab} tokens but the model's vocab_size is "
            f"{model_cfg.vocab_size}: train a smaller tokenizer or raise vocab_size"
        )
    train_set = PackedSequences(cache.tokens("train"), cfg.seq_len)
    val_set = PackedSequences(cache.tokens("validation"), cfg.seq_len)
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"the training split holds {len(train_set)} sequences of {cfg.seq_len} "
                         f"tokens, fewer than one batch of {cfg.batch_size}")
    sampler = SequenceSampler(len(train_set), cfg.seed)

    # ---- model, optimizer, resume ----
    torch.manual_seed(cfg.seed)
    model = DeepseekForCausalLM(model_cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    start_step, position, total_steps, metrics = 0, 0, None, []
    warmup_saved = None  # a resumed run keeps the schedule it started with
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    if resume and ckpt is None:
        print(f"--resume: no complete checkpoint under {ckpt_root}; starting from scratch")
    if ckpt is not None:
        state, opt_sd = load_training_state(ckpt)
        loaded = load_pretrained(ckpt, device=device)
        if loaded.config.replace(name="", dispatch="fast") != model_cfg.replace(name="", dispatch="fast"):
            raise CheckpointError(f"{ckpt}: its model config differs from this run's preset "
                                  f"{cfg.preset!r} with overrides {cfg.model_overrides}")
        model.load_state_dict(loaded.state_dict())
        del loaded
        optimizer.load_state_dict(opt_sd)
        start_step, position, total_steps = state["step"], state["position"], state["total_steps"]
        warmup_saved = state.get("warmup_steps")
        torch.set_rng_state(torch.tensor(state["torch_rng_state"], dtype=torch.uint8))
        metrics = _read_metrics(out / "metrics.jsonl", start_step)
        print(f"resumed from {ckpt} at step {start_step} ({position * cfg.seq_len:,} tokens)")
    elif cfg.steps is not None:
        total_steps = cfg.steps
    elif cfg.tokens is not None:
        total_steps = math.ceil(cfg.tokens / cfg.tokens_per_step)
    warmup = warmup_saved if warmup_saved is not None else cfg.warmup_steps

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16_autocast
                else torch.autocast(device.type, enabled=False))

    def train_step(position: int) -> tuple[dict[str, Any], int]:
        """One optimizer step's forward/backward over ``grad_accum`` micro-batches."""
        sums: dict[str, Any] = {"loss": 0.0, "lm_loss": 0.0, "tpe": None, "dropped": None,
                                "exp": None, "dev": None}
        for _ in range(cfg.grad_accum):
            x = batch(train_set, sampler, position, cfg.batch_size).to(device)
            position += cfg.batch_size
            with autocast:
                o = model(x, labels=x)
            if not torch.isfinite(o.loss):
                raise FloatingPointError(f"the loss is {o.loss.item()} at data position {position}")
            (o.loss / cfg.grad_accum).backward()
            sums["loss"] += o.loss.item() / cfg.grad_accum
            sums["lm_loss"] += o.lm_loss.item() / cfg.grad_accum
            for key, val in (("tpe", o.tokens_per_expert), ("dropped", o.dropped_tokens),
                             ("exp", o.expert_balance_loss.detach() / cfg.grad_accum),
                             ("dev", o.device_balance_loss.detach() / cfg.grad_accum)):
                sums[key] = val if sums[key] is None else sums[key] + val
        return sums, position

    # ---- a wall-clock budget becomes a step count: one warm-up step, then the median of three
    # timed ones (none of them applied: gradients are dropped) ----
    if total_steps is None:
        train_step(0)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            train_step(0)
            times.append(time.perf_counter() - t0)
        optimizer.zero_grad(set_to_none=True)
        per_step = sorted(times)[1]
        total_steps = max(1, int(cfg.minutes * 60 / per_step))
        print(f"budget {cfg.minutes} min at {per_step:.2f} s/step: {total_steps} steps "
              f"of {cfg.tokens_per_step:,} tokens")
    warmup = default_warmup(total_steps) if warmup is None else warmup
    train_tokens = len(train_set) * cfg.seq_len
    planned = total_steps * cfg.tokens_per_step
    if planned > train_tokens:
        print(f"warning: {planned:,} tokens planned but the training split holds "
              f"{train_tokens:,}: data will repeat ({planned / train_tokens:.2f} epochs)")
    write_text_atomic(out / "train_config.json", cfg.to_json())
    model_cfg.save(out / "model_config.json")

    # ---- the loop ----
    from tqdm.auto import tqdm

    metrics_path = out / "metrics.jsonl"
    write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in metrics))
    end_step = total_steps if cfg.stop_after is None else min(total_steps, cfg.stop_after)
    bar = tqdm(total=end_step, initial=start_step, disable=not cfg.progress, unit="step",
               dynamic_ncols=True)
    model.train()
    step = start_step
    last_ckpt: Optional[Path] = None
    val_loss: Optional[float] = None
    interrupted = False

    def checkpoint() -> Path:
        return save_training_checkpoint(
            ckpt_root, step, model, optimizer,
            {"position": position, "total_steps": total_steps, "warmup_steps": warmup,
             "seed": cfg.seed, "preset": cfg.preset, "val_loss": val_loss},
            keep=cfg.keep, extra_files={"tokenizer.json": tokenizer.to_str()},
        )

    # A wall-clock budget is also a hard limit, should the machine slow down after calibration.
    deadline = None if cfg.minutes is None or cfg.steps or cfg.tokens else (
        time.perf_counter() + 1.5 * cfg.minutes * 60)
    with _StopFlag() as flag, open(metrics_path, "a") as log:
        while step < end_step:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, warmup, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            sums, position = train_step(position)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            row: dict[str, Any] = {
                "step": step, "tokens": step * cfg.tokens_per_step, "loss": sums["loss"],
                "lm_loss": sums["lm_loss"], "lr": lr, "grad_norm": grad_norm.item(),
                "tokens_per_s": cfg.tokens_per_step / dt, "epoch": position / len(train_set),
            }
            if sums["tpe"] is not None and sums["tpe"].numel():
                row["expert_balance_loss"] = sums["exp"].tolist()
                row["device_balance_loss"] = sums["dev"].tolist()
                row["dropped_tokens"] = sums["dropped"].tolist()
                row["tokens_per_expert"] = sums["tpe"].tolist()
                row.update(load_stats(sums["tpe"]))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < end_step:
                row["val_loss"] = evaluate_loss(model, val_set, cfg.eval_sequences, cfg.batch_size, device)
            log.write(json.dumps(row) + "\n")
            log.flush()
            metrics.append(row)
            post = {"loss": f"{row['lm_loss']:.3f}", "lr": f"{lr:.2e}",
                    "tok/s": f"{row['tokens_per_s']:,.0f}"}
            if "load_cv" in row:
                post["cv"] = f"{sum(row['load_cv']) / len(row['load_cv']):.2f}"
            bar.set_postfix(post)
            bar.update(1)
            if flag.stop:
                interrupted = True
                break
            if deadline is not None and time.perf_counter() > deadline:
                print(f"\nstopping at step {step}: 1.5x the {cfg.minutes} min budget has passed "
                      "(the machine slowed down); --resume finishes the schedule")
                interrupted = True
                break
            if step % cfg.ckpt_every == 0 and step < end_step:
                last_ckpt = checkpoint()
        bar.close()
        val_loss = evaluate_loss(model, val_set, cfg.eval_sequences, cfg.batch_size, device)
        final = {"step": step, "tokens": step * cfg.tokens_per_step, "val_loss": val_loss,
                 "final": True}
        log.write(json.dumps(final) + "\n")
        metrics.append(final)
        last_ckpt = checkpoint()

    plots: list[Path] = []
    try:
        from .plots import plot_expert_load, plot_loss_curve

        title = f"{cfg.preset}: {model_cfg.num_hidden_layers} layers, hidden {model_cfg.hidden_size}"
        plots = [plot_loss_curve(metrics, out / "loss_curve.png", title),
                 plot_expert_load(metrics, model_cfg, out / "expert_load.png")]
        plots = [p for p in plots if p is not None]
    except ImportError as e:  # matplotlib is a runtime dependency; say so if it is missing
        print(f"plots skipped: {e}")
    return TrainResult(out, step, total_steps, step * cfg.tokens_per_step, val_loss, last_ckpt,
                       interrupted, time.perf_counter() - t_start, plots)
