import itertools
import time
from enum import Enum, auto

import torch

from .sampling_params import SamplingParams


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request: its tokens, its place in the paged KV cache and its output so far."""
    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams):
        self.seq_id = next(Sequence._ids)
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0        # tokens whose K/V are in the cache
        self.num_cached_prompt = 0   # prompt tokens found in the prefix cache at first admission
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        # a seeded request's random stream; the sampler makes it on the logits' device at the
        # first sample (a CPU generator cannot drive CUDA tensors)
        self.generator: torch.Generator | None = None
        self.text = ""
        # per output token, when params.logprobs is set: {token id: Logprob}, the sampled token first
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        self.detokenizer = None  # set by the engine when it has a tokenizer
        self.emitted = 0         # characters of text already streamed
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token: int):
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.token_ids.append(token)

    def finish(self, reason: str):
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.finish_time = time.perf_counter()
