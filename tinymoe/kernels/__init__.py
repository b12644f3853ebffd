"""Hot ops. Torch implementations here; Triton twins behind a backend switch (see docs/DESIGN.md)."""
from .norm import rms_norm
from .rotary import apply_rotary

__all__ = ["rms_norm", "apply_rotary"]
