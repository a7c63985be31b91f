"""The CPU path's deferred expert counting equals immediate counting into a tensor."""

from __future__ import annotations

import torch

from malora_runtime.kernels.cpu import add_malora_delta_cpu
from malora_runtime.kernels.routing_log import RoutingLog
from malora_runtime.kernels.token_slots import TokenSlots
from tests.kernels.conftest import MIXED_SPECS, make_bank, make_weights


def test_routing_log_counts_equal_tensor_counts_and_stay_bounded() -> None:
    gen = torch.Generator().manual_seed(0)
    bank = make_bank([make_weights(spec, 24, 20, gen) for spec in MIXED_SPECS], torch.float32)
    slots = [i % (len(MIXED_SPECS) + 1) - 1 for i in range(97)]  # every slot and tokens with none
    token_slots = TokenSlots.from_list(slots)
    x = torch.randn(97, 24)
    immediate = torch.zeros(bank.num_slots, bank.maxima[2], dtype=torch.int64)
    log = RoutingLog(max_entries=3)
    for _ in range(4):
        add_malora_delta_cpu(torch.zeros(97, 20), x, bank, token_slots, immediate)
        add_malora_delta_cpu(torch.zeros(97, 20), x, bank, token_slots, log)
    assert len(log.entries) < 3  # folded into totals past max_entries
    drained = log.drain(bank.num_slots)
    width = drained.shape[1]  # the most experts of any recorded group
    assert torch.equal(drained, immediate[:, :width]) and immediate[:, width:].sum() == 0
    assert log.drain(bank.num_slots).sum() == 0


def test_a_fold_inside_the_forward_can_be_drained_outside_it() -> None:
    # The engine's forward runs in inference mode and the harvest does not: a fold in one and a drain
    # in the other must both work (a tensor made in inference mode cannot be updated outside it).
    gen = torch.Generator().manual_seed(1)
    bank = make_bank([make_weights(spec, 24, 20, gen) for spec in MIXED_SPECS], torch.float32)
    token_slots = TokenSlots.from_list([0, 1, 2, 3, 4, -1])
    log = RoutingLog(max_entries=2)
    for _ in range(3):
        with torch.inference_mode():
            add_malora_delta_cpu(torch.zeros(6, 20), torch.randn(6, 24), bank, token_slots, log)
        log.drain(bank.num_slots)
        add_malora_delta_cpu(torch.zeros(6, 20), torch.randn(6, 24), bank, token_slots, log)
    assert log.drain(bank.num_slots).sum() > 0
