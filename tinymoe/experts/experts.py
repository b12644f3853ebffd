import torch
from torch import nn

from ..kernels import backend_for
from ..kernels.cpu_linear import moe
from ..kernels.moe_align import moe_align
from ..kernels.moe_gemm import fused_moe
from .dispatch import assign_copies, copy_table
from .plan import ExpertPlan
from .pools import FullPool, Int4Pool, Int8Pool

BLOCK_M = 16  # rows per tile of the Triton grouped GEMM


class Experts(nn.Module):
    """The routed experts of one MoE layer, as physical copies in precision pools.

    The checkpoint's weights stay the parameters `w_gate`, `w_up` `[E, I, D]` and `w_down`
    `[E, D, I]` (the loader fills them in place). The full-precision pool stacks gate and up as
    one `[E, 2I, D]` tensor and re-points `w_gate`/`w_up` at views of it, so nothing is stored
    twice. `apply_plan` adds int8/int4 pools for the plan's quantised copies; the source weights
    stay resident so that any later plan can be applied.
    """

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
        super().__init__()
        E, I, D = w_gate.shape
        if w_up.shape != w_gate.shape or w_down.shape != (E, D, I):
            raise ValueError(f"expert weights do not fit: gate {tuple(w_gate.shape)}, up {tuple(w_up.shape)}, "
                             f"down {tuple(w_down.shape)} (want [E, I, D], [E, I, D], [E, D, I])")
        self.w_gate = nn.Parameter(w_gate, requires_grad=False)
        self.w_up = nn.Parameter(w_up, requires_grad=False)
        self.w_down = nn.Parameter(w_down, requires_grad=False)
        self.quantised = nn.ModuleDict()
        self._full: FullPool | None = None
        self._full_key = None  # the parameters' storage the pool was built from
        # [T, k] copies chosen in the last forward (the one-call decode step's native top-k leaves it)
        self.last_physical_ids: torch.Tensor | None = None
        self.apply_plan(ExpertPlan.default(self.num_experts))

    @property
    def num_experts(self) -> int:
        return self.w_gate.shape[0]

    @property
    def num_copies(self) -> int:
        return len(self.plan.copies)

    @property
    def one_full_copy_each(self) -> bool:
        """Is every expert served by exactly its own full-precision weights (the default plan)?"""
        return self._identity

    @property
    def full_copy_rows(self) -> list[int] | None:
        """When every copy is full precision: each copy's expert row in the full pool; else None."""
        return self._full_rows

    def apply_plan(self, plan: ExpertPlan) -> None:
        """Serve the router's logical experts from the plan's physical copies."""
        E = self.num_experts
        bad = [c for c in plan.copies if not 0 <= c.expert < E or c.precision not in ("full", "int8", "int4")]
        if bad:
            raise ValueError(f"expert plan has invalid copies {bad[:3]} for {E} experts")
        self.plan = plan
        self._table, self._counts = copy_table(plan, E)
        self._identity = [(c.expert, c.precision) for c in plan.copies] == [(e, "full") for e in range(E)]
        # physical copy -> (pool name, weight row); quantised copies of one expert share a row
        self._where: list[tuple[str, int]] = []
        quant_experts: dict[str, list[int]] = {"int8": [], "int4": []}
        for c in plan.copies:
            if c.precision == "full":
                self._where.append(("full", c.expert))
            else:
                rows = quant_experts[c.precision]
                if c.expert not in rows:
                    rows.append(c.expert)
                self._where.append((c.precision, rows.index(c.expert)))
        self._full_rows = [row for _, row in self._where] if all(p == "full" for p, _ in self._where) else None
        self.quantised = nn.ModuleDict()
        if any(quant_experts.values()):
            full = self.full_pool()
            for precision, pool_cls in (("int8", Int8Pool), ("int4", Int4Pool)):
                if quant_experts[precision]:
                    self.quantised[precision] = pool_cls(full.w13, full.w2, quant_experts[precision])
        self._copy_rows = None  # per-pool [C] int32 tables for the kernels, built on first use

    def full_pool(self) -> FullPool:
        """The unquantised pool, rebuilt when the parameters were replaced (loading, .to())."""
        gate, up, down = self.w_gate, self.w_up, self.w_down
        key = (gate.data_ptr(), up.data_ptr(), down.data_ptr(), gate.dtype)
        if key != self._full_key and gate.device.type != "meta":
            E, I, D = gate.shape
            if gate.stride() == (2 * I * D, D, 1) and up.stride() == gate.stride() and \
                    up.data_ptr() == gate.data_ptr() + I * D * gate.element_size():
                w13 = gate.data.as_strided((E, 2 * I, D), (2 * I * D, D, 1))  # already one block (fuse_storage)
            else:
                w13 = torch.cat((gate.data, up.data), 1)
                gate.data, up.data = w13[:, :I], w13[:, I:]
            self._full = FullPool(w13, down.data)
            self._full_key = (gate.data_ptr(), up.data_ptr(), down.data_ptr(), gate.dtype)
            self._copy_rows = None
        return self._full

    def fuse_storage(self) -> None:
        """Before loading: gate and up become views of one fresh [E, 2I, D] tensor (contents
        discarded), the full-precision pool's layout, so loading fills it in place."""
        E, I, D = self.w_gate.shape
        w13 = torch.empty(E, 2 * I, D, dtype=self.w_gate.dtype, device=self.w_gate.device)
        self.w_gate.data, self.w_up.data = w13[:, :I], w13[:, I:]

    def _pool(self, name: str):
        return self.full_pool() if name == "full" else self.quantised[name]

    def weight_bytes(self) -> int:
        """Bytes of expert weights the plan's copies take, counting scales and zero points (each
        copy counted, although copies of one expert in one precision share storage here)."""
        E, I, D = self.w_gate.shape
        full = (2 * I * D + D * I) * self.w_gate.element_size()
        per = {"full": full, **{p: pool.copy_bytes() for p, pool in self.quantised.items()}}
        return sum(per[c.precision] for c in self.plan.copies)

    def physical_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if self._identity:
            return ids
        if self._table.device != ids.device:
            self._table, self._counts = self._table.to(ids.device), self._counts.to(ids.device)
        return assign_copies(ids, self._table, self._counts)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        phys = self.physical_ids(ids)
        self.last_physical_ids = phys
        if phys.numel() == 0:
            return torch.zeros_like(x)
        if backend_for(x) == "triton":
            return self._forward_kernels(x, phys, weights)
        return self._forward_grouped(x, phys, weights)

    def _forward_grouped(self, x, phys, weights):
        # the CPU path: one matmul per active copy over its rows, no per-token work
        k = phys.shape[1]
        if self._full_rows is not None:  # every copy full precision: one native call for all of them
            pool = self.full_pool()
            out = moe(x, phys, weights, pool.w13, pool.w2, self._full_rows)
            if out is not None:
                return out
        if phys.shape[0] == 1:  # decode at batch 1: nothing to sort or scatter; same sums, same order
            out = torch.zeros_like(x)
            # rounded to x's dtype first, a Python float multiplies exactly as the tensor would
            for copy, weight in sorted(zip(phys[0].tolist(), weights[0].to(x.dtype).tolist())):
                name, row = self._where[copy]
                out += self._pool(name).mlp(row, x).to(x.dtype) * weight
            return out
        flat = phys.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_copies).tolist()
        token = order // k
        xs = x.index_select(0, token)
        ys = torch.empty_like(xs)
        start = 0
        for copy, n in enumerate(counts):
            if n:
                name, row = self._where[copy]
                ys[start:start + n] = self._pool(name).mlp(row, xs[start:start + n])
                start += n
        ys.mul_(weights.reshape(-1).index_select(0, order).to(ys.dtype)[:, None])
        return torch.zeros_like(x).index_add_(0, token, ys)

    def _kernel_tables(self, device):
        if self._copy_rows is None or next(iter(self._copy_rows.values())).device != device:
            tables = {}
            for name in dict.fromkeys(pool for pool, _ in self._where):
                rows = [row if pool == name else -1 for pool, row in self._where]
                tables[name] = torch.tensor(rows, dtype=torch.int32, device=device)
            self._copy_rows = tables
        return self._copy_rows

    def _forward_kernels(self, x, phys, weights):
        # the GPU path: sort and pad assignments once, then one grouped GEMM launch pair per pool
        T, k = phys.shape
        self.full_pool()
        sorted_ids, tile_copy = moe_align(phys.to(torch.int32), self.num_copies, BLOCK_M)
        out = torch.empty(T * k, x.shape[1], dtype=torch.float32, device=x.device)
        for name, copy_row in self._kernel_tables(x.device).items():
            fused_moe(x, weights, sorted_ids, tile_copy, copy_row, self._pool(name).kernel_weights(),
                      out, BLOCK_M)
        return out.view(T, k, -1).sum(1).to(x.dtype)
