import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from malora_runtime.engine.sampler import Sampler
from malora_runtime.engine.sequence import Sequence
from malora_runtime.sampling_params import SamplingParams

EOS = 3
V = 32


def seq(prompt=(5, 6, 7), outputs=(), rid="r", **params) -> Sequence:
    s = Sequence(rid, list(prompt), SamplingParams(max_tokens=100, **params))
    for t in outputs:
        s.append_token(t)
    return s


def rand_logits(b, v=V, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def reference_penalties(logits: torch.Tensor, s: Sequence) -> torch.Tensor:
    """Slow per-token reference: repetition (HF) on prompt+output, then OpenAI frequency/presence."""
    p, x = s.sampling_params, logits.clone()
    for t in set(s.token_ids):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in s.output_counts.items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


def test_all_greedy_is_argmax_and_ties_go_to_lowest_id():
    logits = rand_logits(4)
    logits[2, 9] = logits[2, 20] = logits[2].max() + 1
    before = logits.clone()
    out = Sampler([EOS])(logits, [seq(temperature=0) for _ in range(4)])
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.token_ids[2] == 9
    assert out.logprobs is None and out.top_token_ids is None
    assert torch.equal(logits, before)
    # A real vocabulary's width (the reduction is split across vector lanes and threads): still the lowest id.
    wide = torch.randn(3, 49152)
    wide[0, [40000, 17, 30001]] = 50.0
    wide[1, [49151, 16, 15]] = 50.0
    wide[2] = 1.0
    out = Sampler([EOS])(wide, [seq(temperature=0) for _ in range(3)])
    assert out.token_ids.tolist() == [17, 15, 0]


@pytest.mark.parametrize(
    "params",
    [
        {"repetition_penalty": 1.7},
        {"repetition_penalty": 0.6},
        {"frequency_penalty": 0.9},
        {"presence_penalty": -1.3},
        {"repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.7},
    ],
)
def test_penalties_match_reference(params):
    penalised = seq(prompt=(1, 2, 2, 30), outputs=(2, 4, 4, 4, 17), temperature=0, logprobs=V - 12, **params)
    neighbour = seq(prompt=(8,), outputs=(8, 9), temperature=0, logprobs=0)  # no penalties: untouched
    logits = rand_logits(2, seed=1)
    out = Sampler()(logits, [penalised, neighbour])
    expected = reference_penalties(logits[0], penalised)
    # The 20 best of the 32 processed logprobs (values and order) must match the reference.
    ref = torch.log_softmax(expected, -1).topk(V - 12)
    assert torch.allclose(out.top_logprobs[0], ref.values, atol=1e-5)
    assert out.top_token_ids[0].tolist() == ref.indices.tolist()
    assert out.token_ids.tolist() == [expected.argmax().item(), logits[1].argmax().item()]
    assert out.logprobs[1].item() == pytest.approx(torch.log_softmax(logits[1], -1).max().item(), abs=1e-5)


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(3, V)
    logits[:, EOS] = 10
    logits[:, 11] = 9
    logits[:, 12] = 8
    seqs = [
        seq(temperature=0, min_tokens=2, outputs=(4,), stop_token_ids=[11]),  # 1 < 2: masked
        seq(temperature=0, min_tokens=2, outputs=(4, 4)),  # reached: EOS allowed
        seq(temperature=0, min_tokens=2, ignore_eos=True, stop_token_ids=[11]),  # EOS is not a stop
    ]
    assert Sampler([EOS])(logits, seqs).token_ids.tolist() == [12, EOS, EOS]


def test_top_k_one_and_tiny_top_p_are_argmax():
    logits = rand_logits(6, seed=2)
    seqs = [seq(top_k=1, temperature=1.5) for _ in range(3)] + [seq(top_p=1e-4) for _ in range(3)]
    for _ in range(5):
        assert Sampler()(logits, seqs).token_ids.tolist() == logits.argmax(-1).tolist()


def draw(sampler, logits_row, params, n=400):
    seqs = [seq(**params) for _ in range(n)]
    return sampler(logits_row.expand(n, -1).clone(), seqs).token_ids


def test_filters_only_keep_allowed_tokens():
    torch.manual_seed(0)
    row = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05] + [0.0] * (V - 5)) + 1e-12)
    sampler = Sampler()
    assert set(draw(sampler, row, {"top_k": 2}).tolist()) == {0, 1}
    # top_p=0.7: {0.4, 0.3} already reach 0.7, so the nucleus is exactly two tokens.
    assert set(draw(sampler, row, {"top_p": 0.7}).tolist()) == {0, 1}
    assert set(draw(sampler, row, {"top_p": 0.71}).tolist()) == {0, 1, 2}
    # min_p=0.3: keep p >= 0.12.
    assert set(draw(sampler, row, {"min_p": 0.3}).tolist()) == {0, 1, 2}
    # top_p applies after top_k: renormalised over the top 3 (0.47, 0.35, 0.18) two tokens reach 0.8;
    # over the whole vocabulary (0.4, 0.3) they would not.
    assert set(draw(sampler, row, {"top_k": 3, "top_p": 0.8}).tolist()) == {0, 1}


def test_temperature_shapes_the_distribution():
    torch.manual_seed(1)
    row = torch.tensor([1.0, 0.0] + [-30.0] * (V - 2))
    n = 4000
    for temp in (0.5, 1.0, 2.0):
        frac = (draw(Sampler(), row, {"temperature": temp}, n) == 0).float().mean().item()
        expected = 1 / (1 + math.exp(-1 / temp))
        assert abs(frac - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 0.01


def test_seeded_rows_do_not_depend_on_the_batch():
    logits_alone = rand_logits(1, seed=3)

    def tokens(batch_size, position, steps=6):
        target = seq(seed=1234, temperature=0.9, top_k=20, rid="target")
        others = [seq(temperature=1.0 + 0.1 * i, top_p=0.9, rid=f"o{i}") for i in range(batch_size - 1)]
        got = []
        for step in range(steps):
            batch = others[:position] + [target] + others[position:]
            logits = rand_logits(batch_size, seed=100 + step)
            logits[position] = logits_alone[0] + step
            token = Sampler()(logits, batch).token_ids[position].item()
            target.append_token(token)
            got.append(token)
        return got

    alone = tokens(1, 0)
    assert tokens(5, 2) == alone and tokens(8, 7) == alone
    other_seed = seq(seed=99, temperature=0.9, top_k=20)
    assert [Sampler()(logits_alone + s, [other_seed]).token_ids.item() for s in range(6)] != alone


def test_seeded_siblings_differ():
    logits = torch.zeros(1, V)
    a = Sequence("r", [1], SamplingParams(seed=7), seq_index=0)
    b = Sequence("r", [1], SamplingParams(seed=7), seq_index=1)
    ta = [Sampler()(logits, [a]).token_ids.item() for _ in range(8)]
    tb = [Sampler()(logits, [b]).token_ids.item() for _ in range(8)]
    assert ta != tb


def test_logprobs_are_processed_before_temperature():
    logits = rand_logits(3, seed=4)
    seqs = [
        seq(temperature=0.3, logprobs=3, repetition_penalty=1.5, outputs=(1, 2)),
        seq(temperature=0, logprobs=0),
        seq(temperature=0),
    ]
    out = Sampler()(logits, seqs)
    processed = reference_penalties(logits[0], seqs[0])
    lp0 = torch.log_softmax(processed, -1)
    assert out.logprobs[0].item() == pytest.approx(lp0[out.token_ids[0]].item(), abs=1e-5)
    assert out.top_token_ids[0].tolist() == lp0.topk(3).indices.tolist()
    records = out.token_logprobs(seqs)
    assert [t for t, _ in records[0].top] == lp0.topk(3).indices.tolist()
    assert records[0].top[0][1] >= records[0].top[1][1] >= records[0].top[2][1]
    assert records[1].top == [] and records[1].token_id == logits[1].argmax().item()
    assert records[1].logprob == pytest.approx(torch.log_softmax(logits[1], -1).max().item(), abs=1e-5)
    assert records[2] is None


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {
                "temperature": st.sampled_from([0.0, 0.5, 1.0, 1.7]),
                "top_k": st.sampled_from([-1, 0, 1, 4, V]),
                "top_p": st.sampled_from([1.0, 0.9, 0.3]),
                "min_p": st.sampled_from([0.0, 0.2]),
                "min_tokens": st.sampled_from([0, 3]),
                "seed": st.sampled_from([None, 5]),
                "repetition_penalty": st.sampled_from([1.0, 1.3]),
            }
        ),
        min_size=1,
        max_size=6,
    ),
    seed=st.integers(0, 1000),
)
def test_sampled_tokens_respect_every_filter(rows, seed):
    logits = rand_logits(len(rows), seed=seed)
    seqs = [seq(outputs=(EOS,) if i % 2 else (), **r) for i, r in enumerate(rows)]
    tokens = Sampler([EOS])(logits, seqs).token_ids.tolist()
    for i, (r, token) in enumerate(zip(rows, tokens)):
        x = reference_penalties(logits[i], seqs[i])
        if seqs[i].num_output_tokens < r["min_tokens"]:
            x[EOS] = float("-inf")
            assert token != EOS
        if r["temperature"] == 0:
            assert token == x.argmax().item()
            continue
        order = x.argsort(descending=True).tolist()
        if r["top_k"] > 0:
            assert order.index(token) < r["top_k"]
        probs = torch.softmax(x / r["temperature"], -1)
        assert probs[token] >= r["min_p"] * probs.max() * 0.999 or r["top_k"] == 1


def test_logit_bias_is_added_per_row_before_penalties_and_logprobs():
    logits = rand_logits(3)
    before = logits.clone()
    top = int(logits[0].argmax())
    low = int(logits[1].argmin())
    seqs = [seq(temperature=0, logprobs=0, logit_bias={top: -100.0}),
            seq(temperature=0, logprobs=0, logit_bias={low: 100.0, 3: -2.5}),
            seq(temperature=0, logprobs=0)]
    out = Sampler([EOS])(logits, seqs)
    assert int(out.token_ids[0]) != top and int(out.token_ids[1]) == low
    assert int(out.token_ids[2]) == int(logits[2].argmax())  # the row without a bias is untouched
    biased = logits[1].clone()
    biased[low] += 100.0
    biased[3] -= 2.5
    assert float(out.logprobs[1]) == pytest.approx(float(torch.log_softmax(biased, -1)[low]), abs=1e-5)
    assert torch.equal(logits, before)
    rows = logits[:1].repeat(16, 1)
    sampled = Sampler([EOS])(rows, [seq(temperature=1.0, seed=s, logit_bias={top: -100.0}) for s in range(16)])
    assert top not in sampled.token_ids.tolist()


@pytest.mark.parametrize("bias", [{1: 100.5}, {-1: 1.0}, {1.5: 1.0}, {1: float("nan")}, {i: 1.0 for i in range(1025)}])
def test_logit_bias_is_validated(bias):
    with pytest.raises(ValueError, match="^logit_bias"):
        SamplingParams(logit_bias=bias)
