"""RMSNorm, optionally fused with the residual add: torch twin and native CPU op (the Triton
kernel is in norm_triton.py)."""
import torch

from .backend import dispatch
from .native import native, takes


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm in fp32, cast back. With `residual`, normalises x + residual and returns (y, x + residual)."""
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return y if residual is None else (y, residual)


def rms_norm_native(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if not takes(*tensors) or (residual is not None and residual.shape != x.shape):
        return NotImplemented
    D = x.shape[-1]
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty_like(x)
    if residual is None:
        res_in = res_out = None
    else:
        res_in, res_out = residual.contiguous(), torch.empty_like(x)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    native().rms_norm_bf16(ptr(x), ptr(res_in), ptr(weight), ptr(y), ptr(res_out), x.numel() // D, D, eps)
    return y if residual is None else (y, res_out)


rms_norm = dispatch(rms_norm_torch, "norm_triton:rms_norm_triton", rms_norm_native)
