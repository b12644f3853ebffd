"""tinymoe: a small inference engine for Mixture-of-Experts language models.

Nothing is imported until first used: `import tinymoe` loads neither torch nor triton, so the
`tinymoe` command can still choose OpenMP's wait policy before torch starts its runtime."""
import importlib

_PUBLIC = {"load_model": ".models", "load_tokenizer": ".tokenizer", "ROUTERS": ".routing",
           "make_router": ".routing", "Settings": ".settings", "LLM": ".engine", "SamplingParams": ".engine",
           "QuantSpec": ".models.quantize", "parse_quant": ".models.quantize"}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tinymoe' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
