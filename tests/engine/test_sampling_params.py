import pytest

from malora_runtime.sampling_params import SamplingParams


def test_defaults_are_valid_and_random():
    p = SamplingParams()
    assert p.max_tokens == 16 and p.n == 1 and p.logprobs is None
    assert not p.greedy
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.has_penalties


def test_mutable_defaults_are_not_shared():
    a, b = SamplingParams(), SamplingParams()
    a.stop.append("x")
    assert b.stop == []


@pytest.mark.parametrize(
    ("temperature", "greedy"), [(0.0, True), (1e-7, True), (1e-3, False), (0.7, False), (2.0, False)]
)
def test_greedy_property(temperature, greedy):
    assert SamplingParams(temperature=temperature).greedy is greedy


def test_stop_string_becomes_list():
    assert SamplingParams(stop="###").stop == ["###"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
    ],
)
def test_invalid_values_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        SamplingParams(**kwargs)


def test_error_message_shows_value():
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -1"):
        SamplingParams(temperature=-1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": -1}, {"top_k": 0}, {"top_k": 50}, {"logprobs": 0}, {"logprobs": 20},
        {"min_tokens": 16}, {"seed": -3}, {"frequency_penalty": -2}, {"presence_penalty": 2},
        {"stop": ["a", "bc"], "stop_token_ids": [0, 7]}, {"top_p": 1e-3}, {"min_p": 1.0},
    ],
)
def test_boundary_values_accepted(kwargs):
    SamplingParams(**kwargs)


def test_has_penalties():
    assert SamplingParams(repetition_penalty=1.2).has_penalties
    assert SamplingParams(frequency_penalty=0.1).has_penalties
    assert SamplingParams(presence_penalty=-0.1).has_penalties
