"""Expert weights in one precision, stacked: storage, quantisation and bytes. They are computed
by one op, `kernels.moe_experts`, which reads each pool as `kernel_weights()`.

Every pool stores gate and up as one matrix `w13 [n, 2I, D]` (rows 0..I gate, I..2I up) and the
down projection as `w2 [n, D, I]`, so an expert's gate+up is a single matmul.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.moe_op import MoEWeights
from .quant import (INT4_COL_PAD, INT4_ROW_PAD, expert_bytes, int4_group_size, int4_pack_block, int4_padded,
                    pack_int4, quantize_int4, quantize_int8)


class FullPool:
    """Unquantised experts in the checkpoint's dtype; also the source every quantised pool is built
    from. A plain object: its tensors are (views of) the `Experts` parameters."""

    precision = "full"

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        self.w13, self.w2 = w13, w2
        self.inter, self.hidden = w2.shape[2], w2.shape[1]

    def copy_bytes(self) -> int:
        return expert_bytes(self.hidden, self.inter, "full", self.w13.element_size())

    def kernel_weights(self) -> MoEWeights:
        return MoEWeights("full", self.w13, self.w2, None, None, 0, 0, self.inter, self.hidden)


class Int8Pool(nn.Module):
    """int8 weights, one symmetric bf16 scale per output channel."""

    precision = "int8"

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, experts: list[int]):
        super().__init__()
        q13, s13, q2, s2 = [], [], [], []
        for i in experts:  # one expert at a time keeps the fp32 temporaries small
            q, s = quantize_int8(w13[i]); q13.append(q); s13.append(s)
            q, s = quantize_int8(w2[i]); q2.append(q); s2.append(s)
        self.register_buffer("q13", torch.stack(q13), persistent=False)
        self.register_buffer("s13", torch.stack(s13), persistent=False)
        self.register_buffer("q2", torch.stack(q2), persistent=False)
        self.register_buffer("s2", torch.stack(s2), persistent=False)
        self.inter, self.hidden = w2.shape[2], w2.shape[1]

    def copy_bytes(self) -> int:
        return expert_bytes(self.hidden, self.inter, "int8", 0)

    def kernel_weights(self) -> MoEWeights:
        return MoEWeights("int8", self.q13, self.q2, self.s13, self.s2, 0, 0, self.inter, self.hidden)


def _pad(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad [N, K] to multiples of (rows, cols)."""
    extra_n, extra_k = -w.shape[-2] % rows, -w.shape[-1] % cols
    return F.pad(w, (0, extra_k, 0, extra_n)) if extra_n or extra_k else w


class Int4Pool(nn.Module):
    """int4 weights, asymmetric per group of K inputs: w = (q - 8) * scale + zero (bf16 scale, zero).

    Packed in the layout of torch's CPU int4 kernel on this CPU (`int4_pack_block`), which
    needs the output channels padded to a multiple of 64 and K to a multiple of 32 (zeros; only
    tiny test models need it); the Triton kernel reads the same bytes."""

    precision = "int4"

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, experts: list[int]):
        super().__init__()
        self.inter, self.hidden = w2.shape[2], w2.shape[1]
        (_, self.k13), (_, self.k2) = int4_padded(2 * self.inter, self.hidden), int4_padded(self.hidden, self.inter)
        self.group13 = int4_group_size(self.k13)
        self.group2 = int4_group_size(self.k2)
        p13, z13, p2, z2 = [], [], [], []
        for i in experts:
            q, sz = quantize_int4(_pad(w13[i], INT4_ROW_PAD, INT4_COL_PAD), self.group13)
            p13.append(pack_int4(q)); z13.append(sz)
            q, sz = quantize_int4(_pad(w2[i], INT4_ROW_PAD, INT4_COL_PAD), self.group2)
            p2.append(pack_int4(q)); z2.append(sz)
        self.register_buffer("p13", torch.stack(p13), persistent=False)  # [n, pad64(2I), pad32(D)/2]
        self.register_buffer("z13", torch.stack(z13), persistent=False)  # [n, pad32(D)/g, pad64(2I), 2]
        self.register_buffer("p2", torch.stack(p2), persistent=False)    # [n, pad64(D), pad32(I)/2]
        self.register_buffer("z2", torch.stack(z2), persistent=False)    # [n, pad32(I)/g, pad64(D), 2]

    def copy_bytes(self) -> int:
        return expert_bytes(self.hidden, self.inter, "int4", 0)

    def kernel_weights(self) -> MoEWeights:
        return MoEWeights("int4", self.p13, self.p2, self.z13, self.z2, self.group13, self.group2,
                          self.inter, self.hidden, int4_pack_block())


POOLS = {pool.precision: pool for pool in (FullPool, Int8Pool, Int4Pool)}  # by kernels.moe_op.PRECISIONS
