from .loader import load_model, parse_dtype
from .transformer import MoEBlock, Transformer

__all__ = ["load_model", "parse_dtype", "MoEBlock", "Transformer"]
