import torch
from torch import nn

from ..kernels.moe_op import PRECISIONS, ExpertCopies, moe_experts
from ..kernels.quant import INT4_GROUP, dequantize, int4_group
from .dispatch import assign_copies, copy_table
from .plan import ExpertPlan
from .pools import FullPool, StoredPool, as_precision, build_pool
from .quant import expert_bytes


class Experts(nn.Module):
    """The routed experts of one MoE layer, as physical copies in precision pools.

    Storage. The experts are stored in a base precision (`base_precision`): "full" in the
    parameters `w_gate`, `w_up` `[E, I, D]` and `w_down` `[E, D, I]` (gate and up views of one
    `[E, 2I, D]` tensor, the full pool's layout; the loader writes them in place), or "int8" /
    "int4" after `fill(read, precision)`, the parameters then empty. A plan's "full" copies mean
    the base precision; other precisions are pools built from the base weights or from `read`.

    Memory. `apply_plan` keeps only what the plan's copies use: base rows of the experts with a
    base copy, and each quantised pool for its own experts. For a full base that no longer
    serves every expert, the parameters become empty and the rows it still serves are stored in
    a pool of their own. Experts filled with `read` read freed weights again when a later plan
    needs them; experts built from parameters (no `read`) keep them all, so any plan applies.

    The experts are computed by one op, `kernels.moe_experts`, over `copies()`: forward is the
    choice of copies plus that call.
    """

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
        super().__init__()
        E, I, D = w_gate.shape
        if w_up.shape != w_gate.shape or w_down.shape != (E, D, I):
            raise ValueError(f"expert weights do not fit: gate {tuple(w_gate.shape)}, up {tuple(w_up.shape)}, "
                             f"down {tuple(w_down.shape)} (want [E, I, D], [E, I, D], [E, D, I])")
        self.shape = (E, I, D)
        self.w_gate = nn.Parameter(w_gate, requires_grad=False)
        self.w_up = nn.Parameter(w_up, requires_grad=False)
        self.w_down = nn.Parameter(w_down, requires_grad=False)
        self.base_precision, self.group, self._read = "full", INT4_GROUP, None
        self.pools = nn.ModuleDict()  # precision -> StoredPool: every pool not held by the parameters
        self._full: FullPool | None = None
        self._full_key = None  # the parameters' storage the full pool was built from
        self._copies: ExpertCopies | None = None  # what the op reads, built on first use
        # [T, k] copies chosen in the last forward (the one-call decode step's native top-k leaves it)
        self.last_physical_ids: torch.Tensor | None = None
        self.shard = None  # an ExpertShard under expert parallelism: this rank keeps only its copies
        self.plan = ExpertPlan.default(E)
        self.apply_plan(self.plan)

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def inter(self) -> int:
        return self.shape[1]

    @property
    def hidden(self) -> int:
        return self.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        """The model's (activations') dtype; full-precision weights are stored in it."""
        return self.w_gate.dtype

    @property
    def num_copies(self) -> int:
        return len(self.plan.copies)

    @property
    def one_full_copy_each(self) -> bool:
        """Is every expert served by exactly its own base-precision weights (the default plan)?"""
        return self._identity

    @property
    def full_copy_rows(self) -> list[int] | None:
        """When every copy is full precision: each copy's row in the full pool; else None."""
        return self.copies().full_rows

    def fill(self, read, precision: str = "full", group: int = INT4_GROUP) -> None:
        """Store the layer's experts in `precision`, the base precision from now on, one expert at
        a time: `read(e) -> (gate [I, D], up [I, D], down [D, I])`, Tensors or QWeights (a quantised
        checkpoint's; gate and up of one expert in one precision and group). Whatever was stored
        before is dropped first (so a read that fails leaves no weights). "full" fills the parameters; "int8" / "int4" a pool, the
        parameters left empty. `read` is kept: later plans read freed weights through it. The
        plan in force stays (and frees what it does not use). Stored on the parameters' device
        (the CPU if they are on meta)."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown expert precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        int4_group(self.hidden, group)  # a bad group is refused before anything is dropped
        if not callable(read):
            raise TypeError(f"Experts.fill: read must be a function of the expert index, not {type(read).__name__}")
        device = self.w_gate.device if self.w_gate.device.type != "meta" else torch.device("cpu")
        self.pools = nn.ModuleDict()
        self._set_params(None, device)
        self.base_precision, self.group, self._read = precision, group, read
        pool = build_pool(precision, list(range(self.num_experts)), read, group, self.dtype, device, self.inter,
                          self.hidden)
        if precision == "full":
            self._set_params(pool)
        else:
            self.pools[precision] = pool
        self.apply_plan(self.plan)

    def apply_plan(self, plan: ExpertPlan) -> None:
        """Serve the router's logical experts from the plan's physical copies, keeping only the
        weights they use (see the class doc)."""
        E = self.num_experts
        bad = [c for c in plan.copies if not 0 <= c.expert < E or c.precision not in PRECISIONS]
        if bad:
            raise ValueError(f"expert plan has invalid copies {bad[:3]} for {E} experts")
        table, counts = copy_table(plan, E)
        self.logical_plan = plan  # as given; `plan` is it placed on the ranks under expert parallelism
        if self.shard is not None:
            plan = self.shard.place(plan)
            table, counts = copy_table(plan, E)
        local = [self.shard is None or c.device == self.shard.rank for c in plan.copies]
        base = self.base_precision
        need: dict[str, set[int]] = {}
        for c, here in zip(plan.copies, local):
            if here:
                need.setdefault(self._pool_name(c.precision), set()).add(c.expert)
        if self._read is None:  # nothing could read freed weights back: the base stays whole
            need.setdefault(base, set()).update(range(E))
        held = self._held()
        new = {}
        for name, experts in need.items():
            experts = sorted(experts)
            if name in held and held[name].experts == experts:
                new[name] = held[name]
            else:
                new[name] = build_pool(name, experts, lambda e, name=name: self._source(e, name, held), self.group,
                                       self.dtype, self.w_gate.device, self.inter, self.hidden)
        whole = base == "full" and new.get("full") is not None and new["full"].experts == list(range(E))
        if whole:
            pool = new.pop("full")
            if pool is not held.get("full"):
                self._set_params(pool)
        elif self._params_hold_base():
            self._set_params(None)
        self.pools = nn.ModuleDict(new)
        self.plan, self._table, self._counts = plan, table, counts
        self._identity = [(c.expert, c.precision) for c in plan.copies] == [(e, "full") for e in range(E)]
        # physical copy -> (pool, row) for the copies held here; copies of one expert in one pool
        # share its row. Under expert parallelism `_local_index` maps a copy to its index among them.
        pools = self._held()
        self._where = []
        self._local_index = torch.full((len(plan.copies),), -1, dtype=torch.int64)
        for i, (c, here) in enumerate(zip(plan.copies, local)):
            if here:
                name = self._pool_name(c.precision)
                self._local_index[i] = len(self._where)
                self._where.append((name, pools[name].row_of[c.expert]))
        self._copy_rank = torch.tensor([c.device for c in plan.copies], dtype=torch.int64)
        self._copies = None

    def set_shard(self, shard) -> None:
        """Serve only this rank's copies (an `experts.parallel.ExpertShard`; None: all of them, the
        single-process case). The plan in force is placed again and what it no longer keeps here
        is freed."""
        self.shard = shard
        self.apply_plan(self.logical_plan)

    def _pool_name(self, precision: str) -> str:
        return self.base_precision if precision == "full" else precision

    def _params_hold_base(self) -> bool:
        return self.base_precision == "full" and self.w_gate.numel() > 0

    def _held(self) -> dict:
        """precision -> every pool held now (the parameters' full pool included)."""
        held = dict(self.pools.items())
        if self._params_hold_base():
            held["full"] = self.full_pool()
        return held

    def _source(self, e: int, precision: str, held: dict):
        """Expert e's (gate, up, down) to build its `precision` copy from: held base weights when
        they serve (a full base, or a base in that precision), else a copy held in that precision,
        else `read`. Each route gives the same numbers (quantising is deterministic)."""
        base = held.get(self.base_precision)
        if base is not None and e in base.row_of and self.base_precision in ("full", precision):
            return base.matrices(e)
        if precision in held and e in held[precision].row_of:
            return held[precision].matrices(e)
        return self._read(e)

    def _set_params(self, pool: StoredPool | None, device=None) -> None:
        """Point the parameters at a full pool of every expert, or (None) leave them empty."""
        if pool is None:
            empty = torch.empty(0, dtype=self.dtype, device=device or self.w_gate.device)
            tensors = (empty, empty.clone(), empty.clone())
        else:
            I = self.inter
            tensors = (pool.w13[:, :I], pool.w13[:, I:], pool.w2)
        for name, t in zip(("w_gate", "w_up", "w_down"), tensors):
            param = getattr(self, name)
            if param.device == t.device:
                param.data = t  # the same Parameter: whoever listed the parameters still sees it
            else:  # (filling experts built on meta) .data cannot change the device
                setattr(self, name, nn.Parameter(t, requires_grad=False))
        self._full = self._full_key = self._copies = None

    def full_pool(self) -> FullPool | None:
        """The full-precision pool: the parameters' (rebuilt when they were replaced: loading,
        .to()), or the stored one of the experts a plan keeps in full precision; None when no
        full-precision weights are held."""
        if not self._params_hold_base():
            return self.pools["full"] if "full" in self.pools else None
        gate, up, down = self.w_gate, self.w_up, self.w_down
        key = (gate.data_ptr(), up.data_ptr(), down.data_ptr(), gate.dtype)
        if key != self._full_key:
            E, I, D = self.shape
            if gate.stride() == (2 * I * D, D, 1) and up.stride() == gate.stride() and \
                    up.data_ptr() == gate.data_ptr() + I * D * gate.element_size():
                w13 = gate.data.as_strided((E, 2 * I, D), (2 * I * D, D, 1))  # already one block (filled)
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
        held = self._held()
        if self._copies is None:
            self._copies = ExpertCopies({name: pool.kernel_weights() for name, pool in held.items()}, self._where)
        return self._copies

    def _apply(self, fn, *args, **kwargs):
        self._copies = self._full = self._full_key = None  # .to() and friends replace the tensors
        return super()._apply(fn, *args, **kwargs)

    def copy_bytes(self, precision: str) -> int:
        """Bytes of one copy in `precision` as stored ("full": the base precision), scales and
        zeros included (`quant.expert_bytes`, which R&Q budgets with)."""
        return expert_bytes(self.hidden, self.inter, self._pool_name(precision), self.dtype.itemsize, self.group)

    def weight_bytes(self) -> int:
        """Bytes of expert weights the plan's copies take, each copy counted (although copies of
        one expert in one precision share storage)."""
        return sum(self.copy_bytes(c.precision) for c in self.plan.copies)

    def resident_bytes(self) -> int:
        """Bytes of the weight tensors actually held (parameters and pools, each storage once);
        the dispatch tables are not counted."""
        storages = {}
        for t in (*self.parameters(), *self.buffers()):
            if t.device.type != "meta":
                s = t.untyped_storage()
                storages[(s.device, s.data_ptr())] = s.nbytes()
        return sum(storages.values())

    def expert_weights(self, e: int, dtype: torch.dtype = torch.float32):
        """(gate [I, D], up [I, D], down [D, I]) of expert e in the base precision, as `dtype`
        values (dequantised), from the held base weights or, when freed, from `read`."""
        base = self._held().get(self.base_precision)
        if base is not None and e in base.row_of:
            ws = base.matrices(e)
        else:
            ws = [as_precision(w, self.base_precision, self.group, self.dtype, self.w_gate.device)
                  for w in self._read(e)]
        return tuple(w.to(dtype) if isinstance(w, torch.Tensor) else dequantize(w, dtype) for w in ws)

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
        if self.shard is not None:
            if observer is not None:
                raise ValueError("calibration observes every expert; calibrate without expert parallelism")
            if self._copy_rank.device != phys.device:
                self._copy_rank, self._local_index = self._copy_rank.to(phys.device), self._local_index.to(phys.device)
            return self.shard.forward(x, phys, weights, self._copy_rank, self._local_index, self.copies())
        seen = None
        if observer is not None:
            seen = lambda copy, xs, h: observer(self.plan.copies[copy].expert, xs, h)  # noqa: E731
        return moe_experts(x, phys, weights, self.copies(), seen)
