"""SwiGLU over a fused gate/up projection: silu(h[..., :I]) * h[..., I:2I]. Torch twin (on every
device) and the native CPU op for bf16."""
import torch
import torch.nn.functional as F

from .backend import dispatch
from .native import native, takes


def swiglu_torch(h: torch.Tensor, inter: int) -> torch.Tensor:
    return F.silu(h[..., :inter]) * h[..., inter:2 * inter]


def swiglu_native(h: torch.Tensor, inter: int) -> torch.Tensor:
    if not takes(h) or h.shape[-1] != 2 * inter:
        return NotImplemented
    h = h.contiguous()
    out = torch.empty(*h.shape[:-1], inter, dtype=h.dtype)
    native().swiglu_bf16(h.data_ptr(), out.data_ptr(), h.numel() // (2 * inter), inter)
    return out


swiglu = dispatch(swiglu_torch, swiglu_torch, swiglu_native)
