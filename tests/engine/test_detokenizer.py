import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from malora_runtime.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! How are you?",
    "héllo wörld, ça va? naïve façade",
    "你好，世界。今天天气很好。",
    "emoji 🎉🚀 family 👨‍👩‍👧 flags 🇫🇷 done",
    "mixed: Ωμέγα, Привет, مرحبا, こんにちは 😀",
    "  leading spaces\n\ttabs\n\nnewlines  ",
]
ALPHABET = st.sampled_from(list("ab éñü你好世界🎉😀👍\n.,!") + [" the", "ing", "ção", "🇫🇷"])
_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    deltas = [detok.step(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    if not detok.stopped:
        deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_round_trip_matches_full_decode(tokenizer, text, chunk):
    ids = tokenizer.encode(text)
    deltas = stream(IncrementalDetokenizer(tokenizer), ids, chunk)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in d for d in deltas)  # partial characters are held back, never emitted


def test_multibyte_character_is_held_until_complete(tokenizer):
    ids = tokenizer.encode("🎉")
    assert len(ids) > 1  # the emoji's bytes span several tokens
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.step([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.step(ids[-1:]) == "🎉"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, skip):
    ids = tokenizer.encode("Hi there") + [tokenizer.eos_token_id] + tokenizer.encode(" again")
    text = "".join(stream(IncrementalDetokenizer(tokenizer, skip_special_tokens=skip), ids))
    assert text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) is not skip


@_SETTINGS
@given(parts=st.lists(ALPHABET, min_size=1, max_size=30))
def test_random_text_round_trips(tokenizer, parts):
    text = "".join(parts)
    ids = tokenizer.encode(text)
    assert "".join(stream(IncrementalDetokenizer(tokenizer), ids)) == text


@_SETTINGS
@given(ids=st.lists(st.integers(0, 49151), min_size=1, max_size=25))
def test_arbitrary_token_ids_match_full_decode(tokenizer, ids):
    # Includes byte tokens that never form valid UTF-8: the flush must still agree with decode().
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(stream(IncrementalDetokenizer(tokenizer), ids)) == expected


def check_stop(tokenizer, text: str, stop: list[str], chunk: int = 1) -> IncrementalDetokenizer:
    ids = tokenizer.encode(text)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    expected = text[:cut]
    detok = IncrementalDetokenizer(tokenizer, stop=stop)
    emitted = ""
    for i in range(0, len(ids), chunk):
        emitted += detok.step(ids[i : i + chunk])
        assert expected.startswith(emitted), (emitted, expected)  # nothing past the cut, ever
        if detok.stopped:
            break
    if not detok.stopped:
        emitted += detok.flush()
    assert emitted == expected == detok.text
    assert detok.stopped == (cut < len(text))
    return detok


@pytest.mark.parametrize(
    ("text", "stop"),
    [
        ("The answer is 42. Next question", ["Next"]),
        ("alpha beta gamma delta", ["a gam"]),  # spans token boundaries
        ("one</s>two", ["</s>"]),
        ("你好世界，再见", ["世界"]),
        ("party 🎉 time", ["🎉"]),  # a stop string made of partial-byte tokens
        ("aaab", ["aab"]),  # overlapping prefix
        ("no stop here", ["zzz"]),
        ("first stop wins: b then a", ["a", "b"]),
    ],
)
def test_stop_strings_are_never_leaked(tokenizer, text, stop):
    detok = check_stop(tokenizer, text, stop)
    if detok.stopped:
        assert detok.stopped_by in stop
        assert detok.step(tokenizer.encode(" more")) == "" and detok.flush() == ""


def test_possible_stop_prefix_is_released_on_flush(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop=["world peace"])
    emitted = "".join(detok.step([t]) for t in tokenizer.encode("hello world"))
    assert emitted == "hello "  # "world" might still become "world peace"
    assert detok.flush() == "world" and not detok.stopped


@_SETTINGS
@given(
    parts=st.lists(ALPHABET, min_size=1, max_size=25),
    span=st.tuples(st.integers(0, 200), st.integers(1, 6)),
    chunk=st.integers(1, 3),
)
def test_random_stop_strings(tokenizer, parts, span, chunk):
    text = "".join(parts)
    start = span[0] % len(text)
    stop = text[start : start + span[1]]
    check_stop(tokenizer, text, [stop, "zz"], chunk)


@given(text=st.text(alphabet="abc", max_size=30), start=st.integers(0, 30),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=6), min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_held_back_suffix_is_the_longest_that_begins_a_stop_string(text, start, stops):
    detok = IncrementalDetokenizer(None, stop=stops)
    detok.decoded, start = text, min(start, len(text))
    expected = max((k for k in range(1, len(text) - start + 1) for s in stops
                    if k < len(s) and s.startswith(text[len(text) - k:])), default=0)
    assert detok._stop_prefix_len(start) == expected
