"""`malora train`: supervised fine-tuning of a MALoRA (or LoRA / MoLoRA baseline) adapter on a frozen base.

Loss on completion tokens only, plus `lb_weight` times the router load-balancing loss; AdamW with
linear warm-up and cosine decay; gradient accumulation; periodic evaluation loss; a progress bar.
The result is written in the MALoRA adapter format, ready for `malora-serve`.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..adapters.format import AdapterConfig, MaloraAdapter
from ..adapters.io import save_adapter
from .data import IGNORE_INDEX, Batch, Example, batches_forever, batches_once, read_jsonl, tokenize
from .layers import (
    DISPATCH,
    INIT_S,
    METHODS,
    AdapterLinear,
    attach,
    detach,
    load_balance_loss,
    make_spec,
    trainable_parameters,
)

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    method: str = "malora"
    """malora, or a baseline: molora (N experts with their own A), lora (rank `rank`)."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    num_experts: int = 4
    rank: int = 8
    """r: each expert's rank (LoRA: the rank R)."""
    subspace_rank: int = 16
    """d: the shared subspace rank (MALoRA only)."""
    top_k: int = 2
    alpha: float | None = None
    """Scale numerator; default 2 r."""
    init_s: str = "random"
    """S at start: random, or svd (top-d right singular vectors of the base weight)."""
    dispatch: str = "dense"
    """How the mixtures run (training/layers.py): "dense" (every expert, fused products) measured faster on this
    CPU at N 4-8 than "sparse" (per-expert grouped products); the results are the same (tested)."""
    steps: int = 200
    """Optimizer steps (each of `grad_accum` micro-batches)."""
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lb_weight: float = 0.01
    eval_every: int = 50
    max_length: int = 256
    seed: int = 0
    dtype: str = "float16"
    """dtype of the saved adapter."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.dispatch not in DISPATCH:
            raise ValueError(f"dispatch must be one of {DISPATCH}, got {self.dispatch!r}")
        if self.init_s not in INIT_S:
            raise ValueError(f"init_s must be one of {INIT_S}, got {self.init_s!r}")
        for name in ("steps", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass
class TrainResult:
    adapter: MaloraAdapter
    trainable_parameters: int
    losses: list[float]  # per optimizer step: the completion loss
    eval_losses: list[tuple[int, float]]  # (step, mean completion loss on the eval set)
    seconds: float


def completion_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over completion tokens, and their number.

    The output head runs only on the positions that predict a completion token (cheap with a big vocab).
    """
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    targets = batch.labels[:, 1:]  # [B, L-1]
    selected = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][selected])  # [n, vocab]
    return nn.functional.cross_entropy(logits.float(), targets[selected]), int(selected.sum())


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def eval_loss(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int, device) -> float:
    total = count = 0.0
    for batch in batches_once(examples, batch_size, pad_id):
        loss, n = completion_loss(model, batch.to(device))
        total += float(loss) * n
        count += n
    return total / max(count, 1)


def train(model: nn.Module, tokenizer, config: TrainConfig, train_records: list[dict],
          eval_records: list[dict] | None = None, base_model: str = "unknown",
          progress: bool = True) -> TrainResult:
    """Train an adapter on `model` (left unchanged afterwards) and return it in the MALoRA format."""
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_examples = [tokenize(tokenizer, r, config.max_length) for r in train_records]
    eval_examples = [tokenize(tokenizer, r, config.max_length) for r in eval_records or []]
    spec = make_spec(config.method, config.num_experts, config.rank, config.subspace_rank, config.top_k,
                     config.alpha)
    model.requires_grad_(False)
    layers = attach(model, config.method, config.targets, spec, config.init_s)
    params = trainable_parameters(layers)
    num_params = sum(p.numel() for p in params)
    log.info("%s: %d adapted layers, %d trainable parameters", config.method, len(layers), num_params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, config.steps))
    for layer in layers.values():
        layer.record_router = config.lb_weight > 0 and spec.num_experts > 1
        layer.dispatch = config.dispatch
    batches = batches_forever(train_examples, config.batch_size, pad_id, config.seed)
    losses: list[float] = []
    evals: list[tuple[int, float]] = []
    start = time.perf_counter()
    was_training = model.training
    try:
        model.train()
        bar = tqdm(range(config.steps), desc=f"train {config.method}", disable=not progress, dynamic_ncols=True)
        for step in bar:
            step_loss = step_lb = 0.0
            for _ in range(config.grad_accum):
                batch = next(batches).to(device)
                loss, _ = completion_loss(model, batch)
                lb = load_balance_loss(layers, batch.attention_mask)
                total = loss if lb is None else loss + config.lb_weight * lb
                (total / config.grad_accum).backward()
                step_loss += float(loss.detach()) / config.grad_accum
                step_lb += 0.0 if lb is None else float(lb.detach()) / config.grad_accum
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.4f}", lb=f"{step_lb:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            last = step + 1 == config.steps
            if eval_examples and (last or (config.eval_every > 0 and (step + 1) % config.eval_every == 0)):
                model.eval()
                evals.append((step + 1, eval_loss(model, eval_examples, config.batch_size, pad_id, device)))
                model.train()
                log.info("step %d: train loss %.4f, eval loss %.4f", step + 1, step_loss, evals[-1][1])
        seconds = time.perf_counter() - start
        adapter = export_adapter(layers, config, base_model)
    finally:
        model.train(was_training)
        detach(model, layers)
    adapter.config.metadata.update({
        "trainable_parameters": num_params, "final_train_loss": losses[-1],
        "eval_loss": evals[-1][1] if evals else None, "train_seconds": round(seconds, 1),
        "train_examples": len(train_examples),
    })
    return TrainResult(adapter, num_params, losses, evals, seconds)


def export_adapter(layers: dict[str, AdapterLinear], config: TrainConfig, base_model: str) -> MaloraAdapter:
    """The trained layers as a MALoRA adapter (float32 tensors; saved in `config.dtype`)."""
    modules = {path: layer.export() for path, layer in layers.items()}
    specs = {path.rsplit(".", 1)[-1]: weights.spec for path, weights in modules.items()}
    training = {k: v for k, v in asdict(config).items() if k != "dtype"}
    adapter_config = AdapterConfig(
        base_model=base_model, target_modules=sorted(specs), modules=specs, dtype=config.dtype,
        description=f"trained with `malora train` ({config.method})", metadata={"training": training},
    )
    return MaloraAdapter(adapter_config, modules)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--model", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--train", required=True, help="JSONL of chat or prompt/completion records")
    parser.add_argument("--eval", default=None, help="JSONL evaluated every --eval-every steps (loss)")
    parser.add_argument("--output", "-o", required=True, help="adapter directory to write")
    parser.add_argument("--method", default=defaults.method, choices=METHODS)
    parser.add_argument("--targets", default=",".join(defaults.targets), help="comma-separated linear names")
    parser.add_argument("--experts", type=int, default=defaults.num_experts, help="N")
    parser.add_argument("--rank", type=int, default=defaults.rank, help="r per expert (LoRA: R)")
    parser.add_argument("--subspace-rank", type=int, default=defaults.subspace_rank, help="d (MALoRA)")
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--alpha", type=float, default=None, help="default: 2 r")
    parser.add_argument("--init-s", default=defaults.init_s, choices=INIT_S)
    parser.add_argument("--dispatch", default=defaults.dispatch, choices=DISPATCH,
                        help="mixtures: every expert fused (dense) or per-expert grouped products (sparse)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--lb-weight", type=float, default=defaults.lb_weight, help="load-balancing loss weight")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        method=args.method, targets=[t for t in args.targets.split(",") if t], num_experts=args.experts,
        rank=args.rank, subspace_rank=args.subspace_rank, top_k=args.top_k, alpha=args.alpha,
        init_s=args.init_s, dispatch=args.dispatch, steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, lb_weight=args.lb_weight,
        eval_every=args.eval_every, max_length=args.max_length, seed=args.seed, dtype=args.dtype,
    )


def run(args: argparse.Namespace) -> int:
    from ..models.loader import load_model

    config = config_from_args(args)
    model, tokenizer, source = load_model(args.model, device=args.device)
    eval_records = read_jsonl(args.eval) if args.eval else None
    result = train(model, tokenizer, config, read_jsonl(args.train), eval_records, source.name,
                   progress=not args.no_progress)
    save_adapter(result.adapter, Path(args.output))
    log.info("wrote %s: %d trainable parameters, final loss %.4f, %.0f s", args.output,
             result.trainable_parameters, result.losses[-1], result.seconds)
    return 0
