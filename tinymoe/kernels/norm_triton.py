"""RMSNorm (optionally fused with the residual add) as a Triton kernel; the op is norm.rms_norm."""
import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr, D, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * D
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
        # round the sum to the activation dtype first, as the torch twin does
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    # res_out_ptr carries the activation dtype (x + residual, or x itself when there is none)
    normed = (x * rstd).to(res_out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {D}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    x2 = x.reshape(-1, D).contiguous()
    rows = x2.shape[0]
    has_res = residual is not None
    res_dtype = torch.promote_types(x.dtype, residual.dtype) if has_res else x.dtype
    y = torch.empty(x.shape, dtype=torch.promote_types(res_dtype, weight.dtype), device=x.device)
    res2 = residual.reshape(-1, D).contiguous() if has_res else x2
    res_out = torch.empty(x.shape, dtype=res_dtype, device=x.device) if has_res else x2
    if rows:
        _rms_norm_kernel[(rows,)](
            x2, res2, weight.contiguous(), y, res_out, D, eps,
            HAS_RESIDUAL=has_res, BLOCK_D=triton.next_power_of_2(D))
    return (y, res_out) if has_res else y


def _aot(dtype: str, hidden: int, residual: bool):
    sig = {"x_ptr": f"*{dtype}", "res_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
           "res_out_ptr": f"*{dtype}", "D": "i32", "eps": "fp32",
           "HAS_RESIDUAL": "constexpr", "BLOCK_D": "constexpr"}
    name = f"rms_norm{'_residual' if residual else ''}_{dtype}_d{hidden}"
    return name, _rms_norm_kernel, sig, {"HAS_RESIDUAL": residual, "BLOCK_D": hidden}


AOT_KERNELS = [_aot(dtype, 4096, residual) for dtype in ("bf16", "fp16", "fp32") for residual in (False, True)]
