"""The one switch that decides whether a hot op runs as a Triton kernel or as its torch twin.

Choosing: `Settings.backend` ("triton" | "torch" | "auto"; `tinymoe.settings`, from
TINYMOE_BACKEND), or in tests `use_backend(name)` (also `with use_backend(...):`, restored on
exit). "auto" runs Triton when the op's first tensor argument is on CUDA, torch otherwise; on the
torch backend an op's native C++ version (bf16 on the CPU, `native.py`) runs when it takes the
inputs. A forced "triton" with CPU tensors runs the kernels in Triton's interpreter (hundreds of
times slower than torch, exact for fp32; for tests), which needs TRITON_INTERPRET=1 before triton
is first imported (tests/conftest.py sets it); without it that is a one-line error.

Nothing here imports triton: an op's Triton launcher lives in a module of its own, imported (with
triton and its kernel definitions) on the op's first call that runs Triton.

Writing an op (the whole API for kernel authors):

    # scale.py: the public op, its torch twin, optionally a native version
    from .backend import dispatch

    def scale_torch(x, s):
        return x * s

    scale = dispatch(scale_torch, "scale_triton:scale_triton")  # same signature as both twins

    # scale_triton.py: the kernel and its launcher; add the module to aot.TRITON_MODULES
    import triton, triton.language as tl

    @triton.jit
    def _scale_kernel(x_ptr, out_ptr, n, s, BLOCK: tl.constexpr):
        ...  # upcast bf16 loads to fp32 first: the interpreter does bf16 arithmetic on raw bits

    def scale_triton(x, s):
        out = torch.empty_like(x)
        _scale_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), s, BLOCK=1024)
        return out

    # what `python -m tinymoe.kernels.aot` compiles: (name, jit function, signature
    # {arg: "*bf16" | "*i32" | "i32" | "fp32" | "constexpr"}, constexprs {arg: value}); one entry
    # per variant worth proving (dtype, tile sizes)
    AOT_KERNELS = [("scale_bf16", _scale_kernel,
                    {"x_ptr": "*bf16", "out_ptr": "*bf16", "n": "i32", "s": "fp32", "BLOCK": "constexpr"},
                    {"BLOCK": 1024})]
"""
import functools
import importlib

import torch

from .. import settings


@functools.cache
def interpreting() -> bool:
    """Does triton run kernels in its interpreter in this process? Imports triton, whose own
    library (tl.sum, ...) was built for the interpreter or the compiler when it was imported."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        raise RuntimeError("the Triton backend needs triton, which is not installed here "
                           "(pyproject installs it on Linux only)") from None
    return not isinstance(tl.sum, triton.runtime.JITFunction)


class use_backend(settings.override):
    """Set the installed settings' backend now; as a context manager, restore it on exit."""

    def __init__(self, name: str):
        super().__init__(backend=name)


def current_backend() -> str:
    """The chosen backend before "auto" is resolved."""
    return settings.current().backend


def backend_for(tensor: torch.Tensor) -> str:
    """"triton" or "torch": what an op whose first tensor argument is `tensor` runs."""
    name = settings.current().backend
    if name == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if name == "triton" and not tensor.is_cuda and not interpreting():
        raise RuntimeError("the Triton backend runs CPU tensors only in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported")
    return name


def _resolve(launcher):
    """A launcher, or "module:function" naming one in a module of this package."""
    if not isinstance(launcher, str):
        return launcher
    module, _, name = launcher.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def dispatch(torch_fn, triton_fn, native_fn=None):
    """The public op: runs `triton_fn` or `torch_fn` (same signature) as `backend_for(args[0])` says.
    `triton_fn` is the launcher or "module:function" naming it, imported on the first call that
    runs it (`op.triton()` resolves it). On the torch backend an optional `native_fn` (the C++ CPU
    library, `native.py`) goes first; it returns NotImplemented for inputs it does not take
    (another dtype, device, layout)."""
    launcher = functools.cache(lambda: _resolve(triton_fn))

    @functools.wraps(torch_fn)
    def op(*args, **kwargs):
        if backend_for(args[0]) == "triton":
            return launcher()(*args, **kwargs)
        if native_fn is not None:
            out = native_fn(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return torch_fn(*args, **kwargs)

    op.__name__ = op.__qualname__ = torch_fn.__name__.removesuffix("_torch")
    op.torch, op.triton, op.native = torch_fn, launcher, native_fn
    return op
