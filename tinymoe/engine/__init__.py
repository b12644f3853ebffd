"""The inference engine: paged KV cache, continuous batching, sampling, streaming."""
from .llm import LLM, RequestOutput, Stream
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "Stream"]
