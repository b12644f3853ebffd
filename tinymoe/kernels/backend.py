"""The one switch that decides whether a hot op runs as a Triton kernel or as its torch twin.

Choosing (process-wide; the latest call wins):
    use_backend("triton" | "torch" | "auto")    # or `with use_backend(...):`, restored on exit
    TINYMOE_BACKEND=torch                        # read when use_backend was never called
"auto" runs Triton when the op's first tensor argument is on CUDA, torch otherwise; on the torch
backend an op's native C++ version (bf16 on the CPU, `native.py`) runs when it takes the
inputs. A forced "triton" with CPU tensors runs the kernels in Triton's interpreter: hundreds
of times slower than torch, exact for fp32; for tests. On a machine without CUDA, importing this module turns
the interpreter on (TRITON_INTERPRET=1) unless TRITON_INTERPRET is already set or triton was
imported first; in that last case a forced "triton" on CPU raises a clear error.

Writing an op (the whole API for kernel authors):

    import triton, triton.language as tl
    from .backend import dispatch

    @triton.jit
    def _scale_kernel(x_ptr, out_ptr, n, s, BLOCK: tl.constexpr):
        ...  # upcast bf16 loads to fp32 first: the interpreter does bf16 arithmetic on raw bits

    def scale_torch(x, s):
        return x * s

    def scale_triton(x, s):
        out = torch.empty_like(x)
        _scale_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), s, BLOCK=1024)
        return out

    scale = dispatch(scale_torch, scale_triton)  # the public op; same signature as both twins

    # Each module with Triton kernels lists what `python -m tinymoe.kernels.aot` compiles:
    # (name, jit function, signature {arg: "*bf16" | "*i32" | "i32" | "fp32" | "constexpr"},
    #  constexprs {arg: value}); one entry per variant worth proving (dtype, tile sizes).
    AOT_KERNELS = [("scale_bf16", _scale_kernel,
                    {"x_ptr": "*bf16", "out_ptr": "*bf16", "n": "i32", "s": "fp32", "BLOCK": "constexpr"},
                    {"BLOCK": 1024})]
"""
import functools
import os
import sys

import torch

# @triton.jit chooses compiler or interpreter when a kernel is defined, from TRITON_INTERPRET.
# Without a GPU the interpreter is the only way a Triton kernel can run at all.
if "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# True when triton's own library (tl.sum, ...) was built for the interpreter: the process can
# run Triton kernels on CPU tensors.
INTERPRETING = not isinstance(tl.sum, triton.runtime.JITFunction)

BACKENDS = ("triton", "torch", "auto")
_chosen: str | None = None


def _valid(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; valid: {', '.join(BACKENDS)}")
    return name


class use_backend:
    """Choose the backend now; as a context manager, restore the previous choice on exit."""

    def __init__(self, name: str):
        global _chosen
        self._previous = _chosen
        _chosen = _valid(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _chosen
        _chosen = self._previous


def current_backend() -> str:
    """The chosen backend before "auto" is resolved."""
    return _chosen or _valid(os.environ.get("TINYMOE_BACKEND") or "auto")


def backend_for(tensor: torch.Tensor) -> str:
    """"triton" or "torch": what an op whose first tensor argument is `tensor` runs."""
    name = current_backend()
    if name == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if name == "triton" and not tensor.is_cuda and not INTERPRETING:
        raise RuntimeError("the Triton backend runs CPU tensors only in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported")
    return name


def dispatch(torch_fn, triton_fn, native_fn=None):
    """The public op: runs `triton_fn` or `torch_fn` (same signature) as `backend_for(args[0])` says.
    On the torch backend an optional `native_fn` (the C++ CPU library, `native.py`) goes first; it
    returns NotImplemented for inputs it does not take (another dtype, device, layout)."""

    @functools.wraps(torch_fn)
    def op(*args, **kwargs):
        if backend_for(args[0]) == "triton":
            return triton_fn(*args, **kwargs)
        if native_fn is not None:
            out = native_fn(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return torch_fn(*args, **kwargs)

    op.__name__ = op.__qualname__ = torch_fn.__name__.removesuffix("_torch")
    op.torch, op.triton, op.native = torch_fn, triton_fn, native_fn
    return op
