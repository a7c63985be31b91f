"""The MALoRA delta on CPU in plain torch: batched products grouped by adapter, no loop over tokens.

The fallback where the native kernel cannot be built, and the second opinion its tests compare with.

Strategy. The adapter tokens of the step (`TokenSlots.order`, already grouped by slot) are laid out
as a padded block per adapter, `[m, L, d_in]` (m segments of adapters of one shape, L the longest);
every product is then one `bmm` over the m adapters:

  [z | logits] = bmm(x_pad, [S; G]^T)   [m, L, d + N]   the shared projection and the router, one pass
  w            = route(logits + bias)   (stable; k, norm, temperature and scale per adapter) -> [m, L, k]
  u            = bmm(z, P^T)            [m, L, N r]     every expert: N r d is cheap
  y            = embedding_bag(rows of the chosen experts' B^T, weights w u)   [m L, d_out]
                 a weighted sum of k r rows of one [m N r, d_out] table per token: reads only the
                 chosen experts' B (1.8x faster than a gather + bmm at T = 2048, 4x at T = 32 here)

The weights are each adapter's packed module (`kernels.packed`), where it lies: a group of one adapter
reads it in place; a group of several stacks their modules for the step (a copy of the active adapters'
weights per module and step: the price of a fallback that keeps no padded bank in memory). Groups hold
adapters of one shape (d, r, N, dtype) and segments of similar length (`plan_groups`), so a long prefill
segment does not pad many short decode segments; a long segment is a group of its own whose products are
2-D, and when its tokens are consecutive rows of the batch, x and y are sliced instead of gathered.
Python-side work is done once, not per module call: a group's constants (`group_constants`) are cached
on the bank until its next slot write, and the plan once per step for each set of active slots and shapes.
Half-precision inputs and weights are computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .routing_log import RoutingLog
from .slot_bank import SlotBank
from .token_slots import TokenSlots

# A segment joins the current group while it is at least half as long as the group's longest one,
# or shorter by at most this many tokens (a few padded rows cost less than another group's ops).
PAD_SLACK = 8
# A segment of at least this many tokens is a group of its own, its [S; G] x one 2-D product: oneDNN's
# matmul beats the batched product from here on (1.3x at 128 tokens, 1.9x at 2048; BENCHMARKS.md).
LONG_SEGMENT = 128


@dataclass
class SegmentGroup:
    """Segments (of `TokenSlots.order`) padded together into one `[m, L, d_in]` block."""

    slots: tuple[int, ...]  # [m], ascending
    starts: list[int]  # [m] offsets into `order`
    lengths: list[int]  # [m]
    first_row: int | None = None  # one segment on consecutive batch rows from here: x, y are sliced
    _layout: tuple[torch.Tensor, torch.Tensor | None] | None = field(default=None, repr=False)

    @property
    def width(self) -> int:
        return max(self.lengths)

    def token_layout(self, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens [m, L] rows of the packed batch, valid [m, L] bool or None when unpadded); built
        once per step (plans are shared by the modules of a step)."""
        if self._layout is None:
            m, width, first = len(self.slots), self.width, self.starts[0]
            padded = any(length != width for length in self.lengths)
            if not padded and self.starts == list(range(first, first + m * width, width)):
                self._layout = order[first: first + m * width].view(m, width), None  # consecutive, unpadded
            else:
                steps = torch.arange(width, device=order.device)
                lengths = torch.tensor(self.lengths, device=order.device).view(m, 1)
                valid = steps < lengths  # padded rows repeat the segment's first token, weight 0
                starts = torch.tensor(self.starts, device=order.device).view(m, 1)
                self._layout = order[starts + torch.where(valid, steps, 0)], valid if padded else None
        return self._layout


@dataclass(frozen=True)
class GroupConstants:
    """What a group's slots imply for the kernel, cached on the bank until its next slot write."""

    d: int  # the group's d, r and N (equal for every slot of a group) and largest top_k
    r: int
    n: int
    k_max: int
    temperatures: torch.Tensor | None  # [m, 1, 1]; None when every router temperature is 1
    k_mask: torch.Tensor | None  # [m, 1, k_max] bool, j < the slot's top_k; None when all equal k_max
    softmax_first: torch.Tensor | bool  # [m, 1, 1] bool when mixed, else the common value
    row_offsets: torch.Tensor  # [m, 1, 1, r]: each slot's first row in the group's B^T table, + 0..r-1
    scales: torch.Tensor  # [m, 1] float32: each slot's alpha / r


def group_constants(bank: SlotBank, slots: tuple[int, ...], device: torch.device) -> GroupConstants:
    def compute() -> GroupConstants:
        infos = [bank.infos[s] for s in slots]
        m = len(slots)
        d, r, n = infos[0].d, infos[0].r, infos[0].num_experts
        k_max = max(info.top_k for info in infos)
        temps = [info.router_temperature for info in infos]
        ks = [info.top_k for info in infos]
        firsts = [info.softmax_first for info in infos]
        return GroupConstants(
            d, r, n, k_max,
            temperatures=None if all(t == 1.0 for t in temps)
            else torch.tensor(temps, dtype=torch.float32, device=device).view(m, 1, 1),
            k_mask=None if all(k == k_max for k in ks)
            else torch.arange(k_max, device=device) < torch.tensor(ks, device=device).view(m, 1, 1),
            softmax_first=firsts[0] if len(set(firsts)) == 1 else torch.tensor(firsts, device=device).view(m, 1, 1),
            row_offsets=(torch.arange(m, device=device) * (n * r)).view(m, 1, 1, 1) + torch.arange(r, device=device),
            scales=torch.tensor([info.scale for info in infos], dtype=torch.float32, device=device).view(m, 1),
        )

    return bank.derived(("group", slots, str(device)), compute)


def _shape(bank: SlotBank, slot: int) -> tuple:
    info = bank.infos[slot]
    return info.d, info.r, info.num_experts, info.dtype


def plan_groups(
    segments: list[tuple[int, int, int]], bank: SlotBank, segment_rows: list[int | None] | None = None
) -> list[SegmentGroup]:
    """Split the active segments into groups of one adapter shape and similar length; inactive slots are
    dropped. A long segment is a group of its own; `segment_rows` (see `TokenSlots`) lets one-segment
    groups slice."""
    rows = dict(zip(segments, segment_rows)) if segment_rows else {}
    by_shape: dict[tuple, list[tuple[int, int, int]]] = {}
    for seg in segments:
        if bank.infos[seg[0]] is not None:
            by_shape.setdefault(_shape(bank, seg[0]), []).append(seg)
    grouped: list[list[tuple[int, int, int]]] = []
    for active in by_shape.values():
        active.sort(key=lambda seg: seg[2] - seg[1], reverse=True)
        width, first = 0, len(grouped)
        for seg in active:
            length = seg[2] - seg[1]
            if len(grouped) > first and length < LONG_SEGMENT and (2 * length >= width or width - length <= PAD_SLACK):
                grouped[-1].append(seg)
            else:
                grouped.append([seg])
                width = length
    groups = []
    for members in grouped:
        members.sort()
        groups.append(SegmentGroup(tuple(s for s, _, _ in members), [a for _, a, _ in members],
                                   [b - a for _, a, b in members],
                                   first_row=rows.get(members[0]) if len(members) == 1 else None))
    return groups


def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [..., k] of the k largest scores, ties to the lower index (as
    `reference.stable_topk`): k rounds of `max`, which returns the first maximal index, for small k;
    a stable sort otherwise. Rounds past a row's finite values may repeat an index; such positions
    are beyond that adapter's top_k and get weight 0."""
    if k > 4:
        values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
        return values[..., :k], indices[..., :k]
    value, index = scores.max(dim=-1, keepdim=True)
    values, indices = [value], [index]
    remaining = scores
    for _ in range(k - 1):
        remaining = remaining.scatter(-1, index, float("-inf"))
        value, index = remaining.max(dim=-1, keepdim=True)
        values.append(value)
        indices.append(index)
    if k == 1:
        return value, index
    return torch.cat(values, -1), torch.cat(indices, -1)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension. For many rows of a few (k or N) scores, as exp(s - max) / sum:
    torch.softmax vectorises along the short last dimension and runs 2-3x slower there."""
    if scores.numel() < 4096:
        return torch.softmax(scores, dim=-1)
    exps = (scores - scores.amax(dim=-1, keepdim=True)).exp_()
    return exps.div_(exps.sum(dim=-1, keepdim=True))


def _route(
    logits: torch.Tensor, consts: GroupConstants
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-adapter routing of padded logits [m, L, N] -> (chosen [m, L, k], weights [m, L, k], k mask).

    Positions j >= an adapter's own top_k get weight 0 and are False in the mask (None: all valid).
    """
    if consts.temperatures is not None:
        logits = logits / consts.temperatures
    top, chosen = _top_k(logits, consts.k_max)
    kmask = consts.k_mask
    if kmask is not None:
        top = top.masked_fill(~kmask, float("-inf"))
    renormalised = _softmax(top)  # over the chosen k; masked positions get 0
    if consts.softmax_first is False:
        return chosen, renormalised, kmask
    full = _softmax(logits).gather(-1, chosen)  # softmax over all N, then top-k
    if kmask is not None:
        full = full.masked_fill(~kmask, 0.0)
    if consts.softmax_first is True:
        return chosen, full, kmask
    return chosen, torch.where(consts.softmax_first, full, renormalised), kmask


def _group_weights(bank: SlotBank, slots: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """([S; G]^T [m, d_in, d + N], P^T [m, d, N r], bias [m, N], B^T table [m N r, d_out]) in float32: one
    adapter's own tensors (viewed; converted when half precision), several stacked for this step."""
    modules = [bank.module(s) for s in slots]
    f32 = torch.float32
    if len(modules) == 1:
        one = modules[0]
        return (one.sgt.unsqueeze(0).to(f32), one.pt.unsqueeze(0).to(f32), one.bias.unsqueeze(0).to(f32),
                one.bt.to(f32))
    return (torch.stack([m.sgt for m in modules]).to(f32), torch.stack([m.pt for m in modules]).to(f32),
            torch.stack([m.bias for m in modules]).to(f32), torch.cat([m.bt for m in modules]).to(f32))


def _run_group(
    y: torch.Tensor,
    x: torch.Tensor,
    bank: SlotBank,
    order: torch.Tensor,
    group: SegmentGroup,
    expert_counts: torch.Tensor | RoutingLog | None,
) -> None:
    """y[tokens of the group] += the group's MALoRA delta (scaled)."""
    m, width, dev = len(group.slots), group.width, x.device
    consts = group_constants(bank, group.slots, dev)
    d, r, n, k_max = consts.d, consts.r, consts.n, consts.k_max
    f32 = torch.float32
    if group.first_row is not None:  # consecutive rows: views, no gather or scatter
        batch_rows = slice(group.first_row, group.first_row + width)
        xp, valid = x[batch_rows].unsqueeze(0).to(f32), None
    else:
        tokens, valid = group.token_layout(order)
        xp = x.index_select(0, tokens.view(-1)).view(m, width, -1).to(f32)

    SGt, Pt, bias, Bt = _group_weights(bank, group.slots)
    long_segment = m == 1 and width >= LONG_SEGMENT
    # [S; G] x in one pass over x, [m, L, d + n]; a long segment as one 2-D product.
    zl = torch.mm(xp[0], SGt[0]).unsqueeze(0) if long_segment else torch.bmm(xp, SGt)
    z = zl[..., :d]  # [m, L, d]
    logits = zl[..., d:] + bias.unsqueeze(1)  # [m, L, n]
    chosen, weights, kmask = _route(logits, consts)

    row_scale = consts.scales
    if valid is not None:
        row_scale = row_scale * valid
    weights = weights * row_scale.unsqueeze(-1)  # [m, L, k], the scale folded in
    u = (torch.mm(z[0], Pt[0]).unsqueeze(0) if long_segment else torch.bmm(z, Pt)).view(m, width, n, r)
    # y = sum over the k chosen experts and r of (w u)[t, j, rho] * B_t^T[rho, :]: a weighted sum of
    # rows of the group's [m N r, d_out] table of B^T, which embedding_bag computes in one pass,
    # reading only the chosen experts' rows (k r per token).
    coefficients = u.gather(2, chosen.unsqueeze(-1).expand(m, width, k_max, r)) * weights.unsqueeze(-1)
    rows = (chosen * r).unsqueeze(-1) + consts.row_offsets  # [m, L, k, r]
    out = torch.nn.functional.embedding_bag(rows.view(m * width, k_max * r), Bt,
                                            per_sample_weights=coefficients.view(m * width, k_max * r),
                                            mode="sum")  # [m L, d_out]
    if group.first_row is not None:
        y[batch_rows].add_(out.view(width, -1).to(y.dtype))  # in place: `+=` would also copy the view back
    else:
        y.index_add_(0, tokens.view(-1), out.view(m * width, -1).to(y.dtype))

    if expert_counts is not None:
        hits = None
        if kmask is not None or valid is not None:
            hits = torch.ones_like(chosen, dtype=torch.int64)
            if kmask is not None:
                hits = hits * kmask
            if valid is not None:
                hits = hits * valid.unsqueeze(-1)
        if isinstance(expert_counts, RoutingLog):
            expert_counts.record(group.slots, chosen, hits, n)  # counted later, off the hot path
            return
        per_slot = torch.zeros(m, n, dtype=torch.int64, device=dev)
        ones = torch.ones_like(chosen, dtype=torch.int64) if hits is None else hits
        per_slot.scatter_add_(1, chosen.reshape(m, -1), ones.reshape(m, -1))
        expert_counts[:, :n].index_add_(0, torch.tensor(group.slots, device=dev), per_slot)


@torch.no_grad()
def add_malora_delta_cpu(
    y: torch.Tensor,
    x: torch.Tensor,
    bank: SlotBank,
    token_slots: TokenSlots,
    expert_counts: torch.Tensor | RoutingLog | None = None,
) -> None:
    """Semantics:
      y[i] += scale[s] * sum_{t in T_i} w_it B[s, t] (P[s, t] (S[s] x[i]))   for s = slots[i] != -1
    with T_i, w_i the routing of logits G[s] x[i] + router_bias[s] (see `reference.route`).
    y [T, d_out] (updated in place), x [T, d_in]; expert_counts [num_slots, n_max] int64 gets +1
    for every (token, chosen expert). Tokens without a slot, or of an inactive slot, are untouched.
    """
    key = ("cpu", bank.derived("shapes", lambda: tuple((s, _shape(bank, s)) for s in bank.active_slots)))
    groups = token_slots.plans.get(key)
    if groups is None:  # the first module of the step with these active slots and shapes
        groups = token_slots.plans[key] = plan_groups(token_slots.segments, bank, token_slots.segment_rows)
    for group in groups:
        _run_group(y, x, bank, token_slots.order, group, expert_counts)


def malora_delta_cpu(
    x: torch.Tensor,
    bank: SlotBank,
    token_slots: TokenSlots,
    out: torch.Tensor | None = None,
    expert_counts: torch.Tensor | RoutingLog | None = None,
) -> torch.Tensor:
    """Semantics:
      out[i] = scale[s] * sum_{t in T_i} w_it B[s, t] (P[s, t] (S[s] x[i]))   for s = slots[i] != -1
      out[i] = 0                                                           otherwise
    x [T, d_in] (float32, bfloat16 or float16) -> out [T, d_out] in x's dtype; every row is written.
    The per-slot scale is included, as in `reference.malora_delta_reference`.
    """
    if out is None:
        out = torch.zeros(x.shape[0], bank.d_out, dtype=x.dtype, device=x.device)
    else:
        out.zero_()
    add_malora_delta_cpu(out, x, bank, token_slots, expert_counts)
    return out
