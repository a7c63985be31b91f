"""`malora bench train`: trainable parameters, training step time and serving cost of MALoRA vs MoLoRA vs LoRA.

Every method is attached to the same frozen base model and timed on the same fixed batch, side by
side in one process: rounds go method by method, so load on the machine hits them alike. A step is
forward + backward + AdamW update; the figure is the median over the timed rounds. Serving cost is
the per-token multiply-adds of the formulas of `docs/malora.md`, summed over the adapted layers.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters.cost import lora_params, malora_macs_per_token, malora_params, molora_macs_per_token, molora_params
from .data import Batch
from .layers import AdapterLinear, attach, detach, load_balance_loss, make_spec, trainable_parameters
from .trainer import completion_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    label: str
    method: str
    num_experts: int
    rank: int
    subspace_rank: int
    top_k: int
    dispatch: str = "sparse"  # the mixtures: per-expert grouped products, or "dense" (MoLoRA fused)
    key: str | None = None  # its name in --json (the headline configuration only)


# The headline configuration (N 4, r 8, k 2, d = r: the paper's kind, 34% fewer parameters than MoLoRA on the
# seven projections) in the four forms --json reports, then the same at N = 8.
SETTINGS = (
    Setting("LoRA R=16", "lora", 1, 16, 16, 1, key="lora"),
    Setting("MoLoRA N=4 r=8 k=2, per-expert dispatch", "molora", 4, 8, 8, 2, "sparse", "molora_dispatch"),
    Setting("MoLoRA N=4 r=8 k=2, fused (dense)", "molora", 4, 8, 8, 2, "dense", "molora_fused"),
    Setting("MALoRA N=4 r=8 d=8 k=2, sparse", "malora", 4, 8, 8, 2, "sparse", "malora"),
    Setting("MALoRA N=4 r=8 d=8 k=2, dense", "malora", 4, 8, 8, 2, "dense"),
    Setting("MoLoRA N=8 r=8 k=2, per-expert dispatch", "molora", 8, 8, 8, 2, "sparse"),
    Setting("MALoRA N=8 r=8 d=8 k=2, sparse", "malora", 8, 8, 8, 2, "sparse"),
)
BASELINE = "molora_dispatch"  # the paper's baseline: MoLoRA with per-expert dispatch (FastMoE)


@dataclass
class Row:
    setting: Setting
    parameters: int
    formula_parameters: int
    macs_per_token: int
    step_seconds: list[float]
    layer_seconds: list[float]

    @property
    def step_median(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def layer_median(self) -> float:
        return statistics.median(self.layer_seconds)


def formula_cost(s: Setting, shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """(parameters, multiply-adds per token) over the adapted layers, by the table in docs/malora.md."""
    spec = make_spec(s.method, s.num_experts, s.rank, s.subspace_rank, s.top_k, None)
    params = macs = 0
    for d_in, d_out in shapes:
        if s.method == "lora":
            params += lora_params(s.rank, d_in, d_out)
            macs += lora_params(s.rank, d_in, d_out)
        elif s.method == "molora":
            params += molora_params(s.num_experts, s.rank, d_in, d_out)
            macs += molora_macs_per_token(s.num_experts, s.top_k, s.rank, d_in, d_out)
        else:
            params += malora_params(spec, d_in, d_out)
            macs += malora_macs_per_token(spec, d_in, d_out)
    return params, macs


def fixed_batch(vocab: int, batch_size: int, seq_len: int, completion_len: int, device) -> Batch:
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : seq_len - completion_len] = -100
    return Batch(ids, torch.ones_like(ids), labels).to(device)


def _swap_in(model: nn.Module, layers: dict[str, AdapterLinear]) -> None:
    for path, layer in layers.items():
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path), leaf, layer)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _train_step(model, layers, optimizer, batch: Batch) -> float:
    """Forward, backward and AdamW on the whole model, with the load-balancing loss `malora train` adds."""
    device = batch.input_ids.device
    _sync(device)
    start = time.perf_counter()
    loss, _ = completion_loss(model, batch)
    balance = load_balance_loss(layers, batch.attention_mask)
    if balance is not None:
        loss = loss + 0.01 * balance
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start


def _layer_step(layer: AdapterLinear, x: torch.Tensor) -> float:
    """Adapter delta alone (no base matmul): forward + backward on one layer's input, the input's gradient
    included (as anywhere past the first layer) and the load-balancing loss."""
    x = x.detach().requires_grad_(True)
    _sync(x.device)
    start = time.perf_counter()
    loss = layer.delta(x).sum()
    balance = load_balance_loss({"layer": layer}, torch.ones(x.shape[0], device=x.device))
    if balance is not None:
        loss = loss + 0.01 * balance
    loss.backward()
    _sync(x.device)
    return time.perf_counter() - start


def bench(model: nn.Module, targets: list[str], settings: tuple[Setting, ...], batch: Batch, rounds: int,
          warmup: int, layer_tokens: int) -> list[Row]:
    device = batch.input_ids.device
    model.requires_grad_(False)
    attached: list[tuple[Setting, dict[str, AdapterLinear], torch.optim.Optimizer]] = []
    for s in settings:
        torch.manual_seed(0)
        spec = make_spec(s.method, s.num_experts, s.rank, s.subspace_rank, s.top_k, None)
        layers = attach(model, s.method, targets, spec)
        with torch.no_grad():  # non-zero B, as after some training (zero B changes nothing in timing anyway)
            for layer in layers.values():
                layer.B.normal_(0, 1e-3)
                layer.dispatch = s.dispatch
                layer.record_router = spec.num_experts > 1
        detach(model, layers)
        attached.append((s, layers, torch.optim.AdamW(trainable_parameters(layers), lr=1e-4)))
    first = next(iter(attached[0][1].values()))
    x = torch.randn(layer_tokens, first.in_features, device=device) * 0.5
    times: dict[str, list[float]] = {s.label: [] for s in settings}
    layer_times: dict[str, list[float]] = {s.label: [] for s in settings}
    for round_index in range(warmup + rounds):
        for s, layers, optimizer in attached:
            _swap_in(model, layers)
            step = _train_step(model, layers, optimizer, batch)
            layer = next(iter(layers.values()))
            one = _layer_step(layer, x)
            layer.zero_grad(set_to_none=True)
            detach(model, layers)
            if round_index >= warmup:
                times[s.label].append(step)
                layer_times[s.label].append(one)
    shapes = [(layer.in_features, layer.out_features) for layer in attached[0][1].values()]
    rows = []
    for s, layers, _ in attached:
        params, macs = formula_cost(s, shapes)
        counted = sum(p.numel() for p in trainable_parameters(layers))
        rows.append(Row(s, counted, params, macs, times[s.label], layer_times[s.label]))
    return rows


def baseline_for(rows: list[Row], r: Row) -> Row:
    """The per-expert-dispatch MoLoRA with the same N (the paper's baseline), else the first MoLoRA."""
    molora = [x for x in rows if x.setting.method == "molora" and x.setting.dispatch == "sparse"]
    same_n = [x for x in molora if x.setting.num_experts == r.setting.num_experts]
    return (same_n or molora or rows)[0]


def markdown(rows: list[Row], command: str, machine: str, base_macs: int) -> str:
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {machine}",
        "",
        "| method (settings) | trainable params | vs MoLoRA | train step (median) | step speed-up vs MoLoRA dispatch "
        "| adapter fwd+bwd, one layer | layer speed-up vs MoLoRA dispatch | serving MACs/token (adapter) "
        "| vs base model |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        base = baseline_for(rows, r)
        lines.append(
            f"| {r.setting.label} | {r.parameters:,} | {r.parameters / base.parameters - 1:+.0%} | "
            f"{r.step_median * 1000:.0f} ms | {base.step_median / r.step_median:.2f}x | "
            f"{r.layer_median * 1000:.2f} ms | {base.layer_median / r.layer_median:.2f}x | "
            f"{r.macs_per_token:,} | {r.macs_per_token / base_macs:.2%} |"
        )
    return "\n".join(lines) + "\n"


def headline_json(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Seconds per call of the headline configuration: {"layer": {key: s}, "step": {key: s}}."""
    keyed = [r for r in rows if r.setting.key is not None]
    return {"layer": {r.setting.key: r.layer_median for r in keyed},
            "step": {r.setting.key: r.step_median for r in keyed}}


def base_macs_per_token(model: nn.Module) -> int:
    """Multiply-adds of every linear layer per token (attention scores excluded), the output head included."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=32, help="tokens with a loss per sequence")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layer-tokens", type=int, default=2048, help="tokens in the one-layer timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--json", default=None, help='write {"layer": {method: s}, "step": {method: s}} (seconds '
                        "per call, the headline configuration) to this file")


def run(args: argparse.Namespace) -> int:
    from ..models.loader import load_model

    model, _, source = load_model(args.model, device=args.device)
    targets = [t for t in args.targets.split(",") if t]
    batch = fixed_batch(model.config.vocab_size, args.batch_size, args.seq_len, args.completion_len, args.device)
    rows = bench(model, targets, SETTINGS, batch, args.rounds, args.warmup, args.layer_tokens)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    machine = f"{device}; torch {torch.__version__}; base {source.name} float32; targets {','.join(targets)}; " \
              f"batch {args.batch_size} x {args.seq_len} tokens ({args.completion_len} with loss)"
    command = "malora bench train " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "malora bench train"
    table = markdown(rows, command, machine, base_macs_per_token(model))
    sys.stdout.write(table)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(headline_json(rows), handle, indent=2)
    return 0
