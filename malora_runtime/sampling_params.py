"""Per-request sampling settings (OpenAI-style), validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

# Below this temperature sampling is treated as greedy: dividing logits by ~0 overflows.
GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries of logit_bias (OpenAI names no bound; each costs a scatter per step)
LOGIT_BIAS_RANGE = 100.0  # OpenAI's: -100 bans a token, +100 all but forces it


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    """Upper bound on generated tokens (finish reason "length")."""
    min_tokens: int = 0
    """EOS and `stop_token_ids` cannot end the output before this many tokens."""
    temperature: float = 1.0
    """0 means greedy (argmax, ties to the lowest token id)."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 or 0 disables top-k."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    """Applied to every token seen in prompt + output (HF/vLLM semantics)."""
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    """Seeded sequences draw from their own generator: same tokens whatever the batch."""
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    """None: none; 0: the sampled token's logprob only; k: plus the top-k alternatives."""
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to these token ids' logits before penalties and sampling (OpenAI's logit_bias)."""
    grammar: str | None = None
    """llguidance grammar the output must follow (`engine.structured`: e.g. a JSON schema's); None: free."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", ">= 1", self.max_tokens)
        _check(
            _is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens", f"in [0, max_tokens={self.max_tokens}]", self.min_tokens,
        )
        _check(self.temperature >= 0, "temperature", ">= 0", self.temperature)
        _check(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k", ">= -1 (-1 or 0 disables)", self.top_k)
        _check(0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _check(self.repetition_penalty > 0, "repetition_penalty", "> 0", self.repetition_penalty)
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]", self.presence_penalty)
        _check(self.seed is None or _is_int(self.seed), "seed", "an int or None", self.seed)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop)
        _check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids", "non-negative ints", self.stop_token_ids,
        )
        _check(_is_int(self.n) and self.n >= 1, "n", ">= 1", self.n)
        _check(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs", f"None or in [0, {MAX_LOGPROBS}]", self.logprobs,
        )
        _check(self.grammar is None or isinstance(self.grammar, str), "grammar", "a string or None", self.grammar)
        self.logit_bias = dict(self.logit_bias)
        _check(len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias", f"at most {MAX_LOGIT_BIAS} entries",
               f"{len(self.logit_bias)} entries")
        _check(all(_is_int(t) and t >= 0 for t in self.logit_bias), "logit_bias", "keyed by token ids (ints >= 0)",
               next((t for t in self.logit_bias if not (_is_int(t) and t >= 0)), None))
        _check(all(isinstance(b, int | float) and not isinstance(b, bool) and -LOGIT_BIAS_RANGE <= b <= LOGIT_BIAS_RANGE
                   for b in self.logit_bias.values()),
               "logit_bias", f"values in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}]",
               next((b for b in self.logit_bias.values()
                     if not (isinstance(b, int | float) and -LOGIT_BIAS_RANGE <= b <= LOGIT_BIAS_RANGE)), None))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
        )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, name: str, expected: str, got: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {got!r}")
