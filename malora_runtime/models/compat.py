"""What the engine needs of a transformers causal LM, adapted or checked once at start.

The engine runs transformers' own modeling code with its paged attention plugged into the attention interface
(`engine.attention`). A family works when every layer's attention goes through that interface with a
`layer_idx`; one that does not (recurrent or hybrid layers, attention computed by hand, features the paged
attention does not implement) must be refused at start with the reason, never answer each request with a 500.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


class UnsupportedModelError(ValueError):
    """The engine cannot serve this model; the message names the model type and the reason."""


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace GPT-2-style `Conv1D` projections (y = x W + b, W [in, out]) by the equal `nn.Linear` (W^T), so
    that they are packed for oneDNN and adapters can target them like any linear layer; returns how many."""
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for parent in list(model.modules()):
        for leaf, child in list(parent.named_children()):
            if not isinstance(child, Conv1D):
                continue
            weight = child.weight.detach()
            linear = nn.Linear(weight.shape[0], weight.shape[1], bias=child.bias is not None,
                               device=weight.device, dtype=weight.dtype)
            linear.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
            if child.bias is not None:
                linear.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
            setattr(parent, leaf, linear)
            replaced += 1
    if replaced:
        log.info("served %d Conv1D projections as linear layers", replaced)
    return replaced


def check_config(model: nn.Module) -> None:
    """Refuse what the engine cannot run before any memory is reserved for it."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"model type {model_type!r}: encoder-decoder models are not served (decoder-only "
                                    "causal LMs only)")
    for needed in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if getattr(config, needed, None) is None:
            raise UnsupportedModelError(f"model type {model_type!r}: its config has no {needed}; the paged KV "
                                        "cache cannot be laid out")


# How far the engine's decode logits may sit from the model's own forward before the model is refused: the mean
# absolute difference over the mean absolute deviation of the reference logits, checked in float32 only. Measured
# on the default model: under 1e-5 in float32; in bfloat16 rounding alone gave 0.01-0.19 depending on the tokens
# (both sides round, differently), too close to a real fault to tell apart, so there the structural checks decide.
PROBE_TOLERANCE = 0.1


def probe_tokens(model: nn.Module) -> list[int]:
    """Three ordinary token ids for the probe (the BOS id first when the config has one)."""
    bos = getattr(model.config, "bos_token_id", None)
    vocab = model.get_input_embeddings().num_embeddings
    first = bos if isinstance(bos, int) and 0 <= bos < vocab else 0
    return [first] + [min(i, vocab - 1) for i in (1, 2)]


# transformers' cache layers that hold only attention K/V (what the paged KV cache replaces); any other kind
# (linear attention, Mamba state, indexed or chunked attention) is state the engine does not carry.
KV_ONLY_CACHE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


@dataclass
class Reference:
    """The model's own forward over the probe tokens: last-position logits and its cache's layer kinds."""

    logits: torch.Tensor
    cache_layers: list[str]
    logits_exact: bool  # computed in float32 or wider: comparable to the engine's within rounding


def reference_forward(model: nn.Module, token_ids: list[int], attention: str) -> Reference:
    """The model's own forward over `token_ids` with transformers' eager attention and its own cache."""
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            ids = torch.tensor([token_ids], device=next(model.parameters()).device)
            out = model(input_ids=ids, use_cache=True)
    finally:
        model.set_attn_implementation(attention)
    cache = out.cache if "cache" in out else out.past_key_values  # `cache` in newer transformers
    return Reference(out.logits[0, -1].float(), [type(layer).__name__ for layer in getattr(cache, "layers", [])],
                     torch.finfo(next(model.parameters()).dtype).bits >= 32)


def probe_failure(model: nn.Module, error: BaseException | None, layers_seen: set[int],
                  served: torch.Tensor | None = None, reference: Reference | None = None
                  ) -> UnsupportedModelError | None:
    """The refusal for a start-up probe that raised, that skipped the paged attention in some layer, whose model
    keeps state besides attention K/V, or whose decode logits are not the model's own; None when it is served."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    if error is not None:
        return UnsupportedModelError(f"model type {model_type!r}: a first step through the paged attention failed "
                                     f"({type(error).__name__}: {error}); this model family is not supported")
    missing = sorted(set(range(config.num_hidden_layers)) - layers_seen)
    if missing:
        return UnsupportedModelError(
            f"model type {model_type!r}: layers {missing[:8]}{'...' if len(missing) > 8 else ''} do not compute "
            "attention through transformers' attention interface (recurrent or hybrid layers, or attention written "
            "by hand), so they cannot use the paged KV cache; this model family is not supported")
    if reference is not None:
        stateful = sorted({kind for kind in reference.cache_layers if kind not in KV_ONLY_CACHE_LAYERS})
        if stateful:
            return UnsupportedModelError(
                f"model type {model_type!r}: its layers keep state besides attention K/V ({', '.join(stateful)} in "
                "transformers' cache: recurrent, linear-attention or hybrid layers), which the paged KV cache does "
                "not carry; this model family is not supported")
    if served is not None and reference is not None and reference.logits_exact:
        spread = (reference.logits - reference.logits.mean()).abs().mean().clamp_min(1e-6)
        distance = float((served - reference.logits).abs().mean() / spread)
        if not distance <= PROBE_TOLERANCE:
            return UnsupportedModelError(
                f"model type {model_type!r}: a decode step through the paged KV cache does not give the model's own "
                f"logits (relative difference {distance:.2f}, allowed {PROBE_TOLERANCE}); this model family is not "
                "supported")
    return None
