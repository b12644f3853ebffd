"""tinymoe: a small inference engine for Mixture-of-Experts language models."""
from .models import load_model
from .tokenizer import load_tokenizer
from .routing import ROUTERS, make_router
from .settings import Settings

__all__ = ["load_model", "load_tokenizer", "LLM", "SamplingParams", "ROUTERS", "make_router", "Settings"]


def __getattr__(name):
    # The engine pulls in more than a bare model load needs; import it on first use.
    if name in ("LLM", "SamplingParams"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(name)
