from dataclasses import dataclass, field, replace

MAX_LOGPROBS = 20  # as OpenAI's top_logprobs


@dataclass
class SamplingParams:
    """How to pick the next token and when to stop. temperature 0 means greedy."""
    temperature: float = 1.0
    top_k: int = 0              # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0   # on prompt and output tokens: logit / p if positive, else * p
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0     # on output tokens (OpenAI): logit - presence * (count > 0) - frequency * count
    frequency_penalty: float = 0.0
    n: int = 1                         # samples per prompt (LLM.generate; sample i uses seed + i)
    logprobs: int | None = None        # None: off; k: the sampled token's log-probability and the k most likely

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be None or in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (all(self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def per_sample(self) -> list["SamplingParams"]:
        """The n requests a prompt becomes, each n=1; a seeded one's i-th sample takes seed + i."""
        return [replace(self, n=1, seed=None if self.seed is None else self.seed + i) for i in range(self.n)]

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
