"""Expert weights in one precision, stacked: storage and building. The op (`kernels.moe_experts`)
reads each pool as `kernel_weights() -> MoEWeights`.

Every pool stores gate and up as one matrix `w13 [n, 2I, D]` (rows 0..I gate, I..2I up) and the
down projection as `w2 [n, D, I]`, so an expert's gate+up is a single matmul: "full" as tensors
in the model's dtype, "int8" / "int4" as `kernels.quant.QWeight` stacks. Row i holds expert
`experts[i]`. Quantised rows are quantised per output channel (and group), so a gate+up stack is
its gate's rows and its up's rows, whether quantised here or read from a quantised checkpoint.
"""
import torch
from torch import nn

from ..kernels import quant
from ..kernels.moe_op import MoEWeights
from ..kernels.quant import QWeight


def as_precision(w, precision: str, group: int, dtype: torch.dtype, device) -> torch.Tensor | QWeight:
    """One weight matrix (a Tensor, or a QWeight from a quantised checkpoint) in `precision`:
    as it is when it already is (int4: in the group these experts use), else converted (a QWeight
    dequantised first). Full precision means `dtype`."""
    if isinstance(w, QWeight):
        if w.precision == precision:
            want = quant.int4_group(w.cols, group) if precision == "int4" else 0
            if w.group != want:
                raise ValueError(f"int4 weights of group {w.group} given to experts stored with group {want} "
                                 f"(requantising int4 would lose precision)")
            return w.to(device)
        w = quant.dequantize(w.to(device), dtype)
    w = w.to(device=device, dtype=dtype)
    return w if precision == "full" else quant.quantize(w, precision, group)


def _rows(w: torch.Tensor | QWeight, a: int, b: int) -> torch.Tensor | QWeight:
    """Output channels a..b of one matrix."""
    return w._replace(q=w.q[a:b], scales=w.scales[a:b]) if isinstance(w, QWeight) else w[a:b]


def _matrix(w: torch.Tensor | QWeight, row: int) -> torch.Tensor | QWeight:
    return w.row(row) if isinstance(w, QWeight) else w[row]


class FullPool:
    """Full-precision experts held by the `Experts` parameters (a plain object over views of
    them, so nothing is stored twice): every expert, row e = expert e."""

    precision = "full"

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        self.w13, self.w2 = w13, w2
        self.inter, self.hidden = w2.shape[2], w2.shape[1]
        self.experts = list(range(w13.shape[0]))
        self.row_of = {e: e for e in self.experts}

    def kernel_weights(self) -> MoEWeights:
        return MoEWeights("full", self.w13, self.w2, self.inter, self.hidden)

    def matrices(self, expert: int):
        """(gate [I, D], up [I, D], down [D, I]) of an expert this pool holds (views)."""
        return matrices(self.kernel_weights(), self.row_of[expert])


def matrices(w: MoEWeights, row: int):
    w13 = _matrix(w.w13, row)
    return _rows(w13, 0, w.inter), _rows(w13, w.inter, 2 * w.inter), _matrix(w.w2, row)


class StoredPool(nn.Module):
    """Experts of one precision stacked in tensors of their own, registered as buffers (`.to()`
    moves them; a dtype change leaves quantised codes and their bf16 scales as they are)."""

    def __init__(self, precision: str, experts: list[int], inter: int, hidden: int):
        super().__init__()
        self.precision, self.experts = precision, list(experts)
        self.row_of = {e: i for i, e in enumerate(self.experts)}
        self.inter, self.hidden = inter, hidden
        self.group13 = self.group2 = 0

    def kernel_weights(self) -> MoEWeights:
        if self.precision == "full":
            return MoEWeights("full", self.w13, self.w2, self.inter, self.hidden)
        p = self.precision
        return MoEWeights(p, QWeight(p, self.q13, self.s13, self.group13, self.hidden),
                          QWeight(p, self.q2, self.s2, self.group2, self.inter), self.inter, self.hidden)

    def matrices(self, expert: int):
        return matrices(self.kernel_weights(), self.row_of[expert])

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.precision != "full":  # the formats' scales are bf16 whatever the model's dtype
            self.s13, self.s2 = self.s13.to(torch.bfloat16), self.s2.to(torch.bfloat16)
        return self


def build_pool(precision: str, experts: list[int], source, group: int, dtype: torch.dtype, device,
               inter: int, hidden: int) -> StoredPool:
    """A pool of `experts` in `precision`, one expert at a time: `source(e)` gives its (gate
    [I, D], up [I, D], down [D, I]) as Tensors or QWeights, converted here (`as_precision`) and
    written into the preallocated stacks, so only one expert's temporaries exist beside them."""
    pool = StoredPool(precision, experts, inter, hidden)
    n, I, D = len(experts), inter, hidden
    for i, e in enumerate(experts):
        gate, up, down = source(e)
        shapes = tuple(tuple(w.shape) for w in (gate, up, down))
        if shapes != ((I, D), (I, D), (D, I)):
            raise ValueError(f"expert {e}: gate, up, down are {', '.join(map(str, shapes))}; want "
                             f"{(I, D)}, {(I, D)}, {(D, I)}")
        kinds = [(w.precision, w.group) if isinstance(w, QWeight) else ("full", 0) for w in (gate, up)]
        if kinds[0] != kinds[1]:
            raise ValueError(f"expert {e}: gate is {kinds[0][0]} (group {kinds[0][1]}) but up is {kinds[1][0]} "
                             f"(group {kinds[1][1]}); gate and up must share one precision and group")
        gate, up, down = (as_precision(w, precision, group, dtype, device) for w in (gate, up, down))
        if precision == "full":
            if i == 0:
                pool.register_buffer("w13", torch.empty(n, 2 * I, D, dtype=dtype, device=device), persistent=False)
                pool.register_buffer("w2", torch.empty(n, D, I, dtype=dtype, device=device), persistent=False)
            pool.w13[i, :I], pool.w13[i, I:], pool.w2[i] = gate, up, down
            continue
        if i == 0:
            for name, rows, w in (("13", 2 * I, gate), ("2", D, down)):
                pool.register_buffer("q" + name, torch.empty(n, rows, *w.q.shape[1:], dtype=w.q.dtype, device=device),
                                     persistent=False)
                pool.register_buffer("s" + name, torch.empty(n, rows, *w.scales.shape[1:], dtype=torch.bfloat16,
                                                             device=device), persistent=False)
            pool.group13, pool.group2 = gate.group, down.group
        pool.q13[i, :I], pool.q13[i, I:], pool.q2[i] = gate.q, up.q, down.q
        pool.s13[i, :I], pool.s13[i, I:], pool.s2[i] = gate.scales, up.scales, down.scales
    return pool


def pool_bytes(pool) -> int:
    """Bytes a pool's tensors take (what `expert_bytes` says per row)."""
    w = pool.kernel_weights()
    return sum(m.nbytes() if isinstance(m, QWeight) else m.numel() * m.element_size() for m in (w.w13, w.w2))

