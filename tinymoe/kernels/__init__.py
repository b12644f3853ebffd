"""Hot ops. Each is a Triton kernel with a torch twin of the same signature, picked per call by
the backend switch in `backend.py` (Triton on CUDA, torch on CPU; see docs/DESIGN.md). On the
CPU, bf16 calls run the native C++ library (`native.py`) when it is built. Importing this
package loads neither triton (its kernels are in the `*_triton` modules, imported on first use)
nor the native library."""
from .backend import backend_for, current_backend, use_backend
from .activation import swiglu
from .attention import paged_attention_decode, paged_attention_prefill, paged_attention_prefill_varlen, store_kv
from .cpu_linear import linear
from .moe_op import ExpertCopies, MoEWeights, moe_experts
from .norm import rms_norm
from .rotary import apply_rotary

__all__ = ["linear", "swiglu", "rms_norm", "apply_rotary", "store_kv", "paged_attention_decode", "paged_attention_prefill",
           "paged_attention_prefill_varlen", "use_backend", "current_backend", "backend_for", "moe_experts",
           "ExpertCopies", "MoEWeights"]
