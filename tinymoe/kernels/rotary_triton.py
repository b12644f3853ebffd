"""Rotate-half rotary embedding as a Triton kernel; the op is rotary.apply_rotary."""
import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, T, H, HALF,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    row = tl.program_id(0)  # one (leading index, position) pair: all heads of one token
    t = row % T
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < H) & (cols < HALF)
    c = tl.load(cos_ptr + t * HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)
    first = row.to(tl.int64) * H * 2 * HALF + heads * 2 * HALF + cols
    x1 = tl.load(x_ptr + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + first, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + first + HALF, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=mask)


def apply_rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    *_, T, H, hd = x.shape
    if hd % 2 or cos.shape != (T, hd // 2) or sin.shape != (T, hd // 2):
        raise ValueError(f"apply_rotary: x {tuple(x.shape)} needs cos/sin of shape {(T, hd // 2)}, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    x = x.contiguous()
    out = torch.empty_like(x)
    rows = x.numel() // (H * hd)
    if rows:
        _rotary_kernel[(rows,)](
            x, cos.contiguous(), sin.contiguous(), out, T, H, hd // 2,
            BLOCK_H=triton.next_power_of_2(H), BLOCK_HALF=triton.next_power_of_2(hd // 2))
    return out


def _aot(dtype: str, heads: int, head_dim: int):
    sig = {"x_ptr": f"*{dtype}", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": f"*{dtype}",
           "T": "i32", "H": "i32", "HALF": "i32", "BLOCK_H": "constexpr", "BLOCK_HALF": "constexpr"}
    return (f"rotary_{dtype}_h{heads}_d{head_dim}", _rotary_kernel, sig,
            {"BLOCK_H": heads, "BLOCK_HALF": head_dim // 2})


AOT_KERNELS = [_aot(dtype, 32, 128) for dtype in ("bf16", "fp16", "fp32")]
