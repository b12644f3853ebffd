import torch
from torch import nn

from ..kernels.moe_op import PRECISIONS, ExpertCopies, moe_experts
from .dispatch import assign_copies, copy_table
from .plan import ExpertPlan
from .pools import POOLS, FullPool
from .quant import expert_bytes


class Experts(nn.Module):
    """The routed experts of one MoE layer, as physical copies in precision pools.

    The checkpoint's weights stay the parameters `w_gate`, `w_up` `[E, I, D]` and `w_down`
    `[E, D, I]` (the loader fills them in place). The full-precision pool stacks gate and up as
    one `[E, 2I, D]` tensor and re-points `w_gate`/`w_up` at views of it, so nothing is stored
    twice. `apply_plan` adds int8/int4 pools for the plan's quantised copies; the source weights
    stay resident so that any later plan can be applied. The experts are computed by one op,
    `kernels.moe_experts`, over `copies()`: forward is the choice of copies plus that call.
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
        self._copies: ExpertCopies | None = None  # what the op reads, built on first use
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
        return self.copies().full_rows

    def apply_plan(self, plan: ExpertPlan) -> None:
        """Serve the router's logical experts from the plan's physical copies."""
        E = self.num_experts
        bad = [c for c in plan.copies if not 0 <= c.expert < E or c.precision not in PRECISIONS]
        if bad:
            raise ValueError(f"expert plan has invalid copies {bad[:3]} for {E} experts")
        self.plan = plan
        self._table, self._counts = copy_table(plan, E)
        self._identity = [(c.expert, c.precision) for c in plan.copies] == [(e, "full") for e in range(E)]
        # physical copy -> (pool name, weight row); quantised copies of one expert share a row
        self._where: list[tuple[str, int]] = []
        quant_experts: dict[str, list[int]] = {p: [] for p in PRECISIONS if p != "full"}
        for c in plan.copies:
            if c.precision == "full":
                self._where.append(("full", c.expert))
            else:
                rows = quant_experts[c.precision]
                if c.expert not in rows:
                    rows.append(c.expert)
                self._where.append((c.precision, rows.index(c.expert)))
        self.quantised = nn.ModuleDict()
        if any(quant_experts.values()):
            full = self.full_pool()
            for precision, experts in quant_experts.items():
                if experts:
                    self.quantised[precision] = POOLS[precision](full.w13, full.w2, experts)
        self._copies = None

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
            self._copies = None
        return self._full

    def copies(self) -> ExpertCopies:
        """The plan's physical copies as `kernels.moe_experts` reads them (rebuilt when the plan or
        the storage changes)."""
        full = self.full_pool()
        if self._copies is None:
            pools = {"full": full.kernel_weights(), **{p: pool.kernel_weights() for p, pool in self.quantised.items()}}
            self._copies = ExpertCopies(pools, self._where)
        return self._copies

    def _apply(self, fn, *args, **kwargs):
        self._copies = None  # .to() and friends replace the quantised pools' buffers
        return super()._apply(fn, *args, **kwargs)

    def fuse_storage(self) -> None:
        """Before loading: gate and up become views of one fresh [E, 2I, D] tensor (contents
        discarded), the full-precision pool's layout, so loading fills it in place."""
        E, I, D = self.w_gate.shape
        w13 = torch.empty(E, 2 * I, D, dtype=self.w_gate.dtype, device=self.w_gate.device)
        self.w_gate.data, self.w_up.data = w13[:, :I], w13[:, I:]

    def weight_bytes(self) -> int:
        """Bytes of expert weights the plan's copies take, counting scales and zero points (each
        copy counted, although copies of one expert in one precision share storage here); the
        pools count with `quant.expert_bytes`, as R&Q's budget does."""
        E, I, D = self.w_gate.shape
        full = expert_bytes(D, I, "full", self.w_gate.element_size())
        per = {"full": full, **{p: pool.copy_bytes() for p, pool in self.quantised.items()}}
        return sum(per[c.precision] for c in self.plan.copies)

    def physical_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if self._identity:
            return ids
        if self._table.device != ids.device:
            self._table, self._counts = self._table.to(ids.device), self._counts.to(ids.device)
        return assign_copies(ids, self._table, self._counts)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, observer=None) -> torch.Tensor:
        """x [T, D], logical ids [T, k], weights [T, k] -> [T, D]. `observer(expert, x_rows, h)`, if
        given, sees each logical expert's input rows and SwiGLU activations (fp32; the op's torch
        twin runs to report them, see kernels/moe_op.py)."""
        phys = self.physical_ids(ids)
        self.last_physical_ids = phys
        seen = None
        if observer is not None:
            seen = lambda copy, xs, h: observer(self.plan.copies[copy].expert, xs, h)  # noqa: E731
        return moe_experts(x, phys, weights, self.copies(), seen)
