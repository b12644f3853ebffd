"""Rotate-half rotary embedding: its frequencies, torch twin and native CPU op (the Triton kernel
is in rotary_triton.py)."""
import math

import torch

from .backend import dispatch
from .native import native, takes


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] fp32, factor on cos/sin) for config.rope_scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    if scaling is None:
        return inv_freq, 1.0
    if scaling["type"] == "linear":  # positions divided by the factor
        return inv_freq / scaling["factor"], 1.0
    if scaling["type"] != "yarn":
        raise ValueError(f"rope scaling {scaling['type']!r} is not implemented")
    # YaRN: pairs that turn fewer than beta_slow times over the pre-training context are
    # interpolated (divided by the factor), those turning more than beta_fast times are kept, and a
    # linear ramp over the pair index blends the two in between.
    original, factor = scaling["original_max_position"], scaling["factor"]

    def pair_turning(turns: float) -> float:  # the (fractional) dimension whose pair turns `turns` times
        return head_dim * math.log(original / (2 * math.pi * turns)) / (2 * math.log(theta))

    lo, hi = pair_turning(scaling["beta_fast"]), pair_turning(scaling["beta_slow"])
    if scaling["truncate"]:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if hi == lo:
        hi += 1e-3
    keep = 1 - ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
    return inv_freq / factor * (1 - keep) + inv_freq * keep, scaling["attention_factor"]


def apply_rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x [..., T, heads, hd]; cos/sin [T, hd/2] (fp32)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def apply_rotary_native(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    *_, T, H, hd = x.shape
    rows = x.numel() // (H * hd)
    # rows at one stride (x may be a view into a fused q/k/v projection), heads packed
    uniform = x.dim() == 3 or (x.dim() == 4 and (x.shape[0] == 1 or x.stride(0) == T * x.stride(1)))
    if (not takes(x) or not uniform or x.stride(-1) != 1 or x.stride(-2) != hd or hd % 2
            or cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.shape != (T, hd // 2)
            or sin.shape != cos.shape):
        return NotImplemented
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype)
    native().rotary_bf16(x.data_ptr(), x.stride(-3), out.data_ptr(), rows, H, hd, cos.data_ptr(), sin.data_ptr(), T)
    return out


apply_rotary = dispatch(apply_rotary_torch, "rotary_triton:apply_rotary_triton", apply_rotary_native)
