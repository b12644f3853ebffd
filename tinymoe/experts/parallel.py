"""One MoE layer's experts under expert parallelism: this rank's copies, and the combine.

Every rank runs the whole batch through the replicated parts (attention, norms, gates, shared
experts, dense layers), so every rank holds every token's hidden state and routes it the same
way (the routers are deterministic and see the same numbers). Dispatch therefore needs no
communication: each rank computes the assignments whose copy it holds (`Copy.device`), one
call of the expert op over them, each assignment's weighted output a row of its own. The
combine makes every rank hold every assignment's row and then sums each token's rows in the
order of their copy ids, rounding to the model's dtype after each term, exactly as the
single-process op sums them (`kernels/moe_cpu.py`); so the result is the single process's
whenever the expert op's rows do not depend on how many rows it was given.

Two combines, the same result: `allgather` (each rank's rows; every rank knows every rank's
count from the routing, so no sizes are exchanged) and `allreduce` (each rank's rows in a zeroed
[T, k, D], summed: exact, as every element is non-zero on one rank at most; twice the bytes, one
collective without padding). `auto` picks by the number of assignments (`bench/ep.py` measures
both). The all-gather goes through shared memory when the ranks share a host (`exchange.py`,
ExpertGroup.shared; TINYMOE_EP_SHM=0 turns it off), else through the process group, each rank's
rows padded to the largest rank's count.
"""
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..kernels.moe_op import moe_experts
from .exchange import SharedRows
from .placement import place

COMBINES = ("auto", "allgather", "allreduce")
# `auto` takes allreduce below this many assignments. bench/ep.py on gloo (2 ranks, tiny-mixtral):
# allgather 1.15-1.40x faster from 2 to 512 assignments (Zen 4 VM, timed from a barrier), so
# allgather everywhere here. A backend with cheaper small all-reduces would raise it.
ALLREDUCE_BELOW = 0


@dataclass
class ExpertGroup:
    """The ranks that share the experts: this one's `rank` of `world`, the torch.distributed
    process group (None: the default one), the combine, and, when `timings` is a list, one
    (busy seconds, layer seconds, assignments here) tuple per MoE layer call (bench --ep; the
    ranks then meet at a barrier before each call, so a layer's seconds are its experts and
    combine, not the ranks' skew from the replicated work before it)."""
    rank: int
    world: int
    pg: object = None
    combine: str = "auto"
    timings: list | None = field(default=None, repr=False)
    shared: SharedRows | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.combine not in COMBINES:
            raise ValueError(f"unknown combine {self.combine!r}; valid: {', '.join(COMBINES)}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside a group of {self.world}")

    def all_gather(self, rows: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """Every rank's rows ([counts[r], D] each), in rank order: through shared memory when the
        ranks share a host and the largest share fits, else the process group's all-gather of
        the shares padded to the largest (every rank knows every count, so none are sent)."""
        width = max(counts)
        if self.shared is not None and self.shared.fits(width * rows.shape[1] * rows.element_size()):
            return self.shared.all_gather(rows, counts)
        padded = rows.new_zeros(width, rows.shape[1])
        padded[:rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.pg)
        return [part[:n] for part, n in zip(parts, counts)]

    def barrier(self) -> None:
        if self.shared is not None:
            self.shared.barrier()
        else:
            dist.barrier(group=self.pg)


class ExpertShard:
    """This rank's part of one layer: where the plan's copies go (`placement`, with the layer's
    calibrated loads `load` [E] when eplb or a replica plan needs them) and the forward."""

    def __init__(self, group: ExpertGroup, placement: str = "contiguous", load=None):
        self.group, self.placement, self.load = group, placement, load

    @property
    def rank(self) -> int:
        return self.group.rank

    def place(self, plan):
        return place(plan, self.group.world, self.placement, self.load)

    def forward(self, x: torch.Tensor, phys: torch.Tensor, weights: torch.Tensor, copy_rank: torch.Tensor,
                local_index: torch.Tensor, local_copies) -> torch.Tensor:
        """x [T, D], physical copy ids [T, k], weights [T, k] -> [T, D] on every rank. `copy_rank`
        [P] is each copy's rank, `local_index` [P] its index among this rank's copies (-1 for
        others), `local_copies` the ExpertCopies of this rank's copies."""
        g = self.group
        if g.timings is not None:  # measured from when every rank is here: what came before
            g.barrier()            # (routing, attention) is replicated, not the straggler
        start = time.perf_counter()
        T, k = phys.shape
        D = x.shape[1]
        flat_owner = copy_rank[phys].reshape(-1)                   # [T k]
        order = torch.argsort(flat_owner, stable=True)             # rank-major, token-major within a rank
        counts = torch.bincount(flat_owner, minlength=g.world).tolist()
        begin = sum(counts[:g.rank])
        mine = order[begin:begin + counts[g.rank]]                 # this rank's assignments, token-major
        if mine.numel():
            local = local_index[phys.reshape(-1)[mine]]
            rows = moe_experts(x[mine // k], local[:, None], weights.reshape(-1)[mine][:, None], local_copies)
        else:  # no assignment here this pass: nothing to compute, an empty share of the combine
            rows = x.new_zeros(0, D)
        busy = time.perf_counter() - start
        method = g.combine
        if method == "auto":
            method = "allreduce" if T * k < ALLREDUCE_BELOW and g.shared is None else "allgather"
        if method == "allreduce":
            every = torch.zeros(T * k, D, dtype=x.dtype, device=x.device)   # in assignment order
            every[mine] = rows
            dist.all_reduce(every, group=g.pg)
            position = torch.arange(T * k, device=x.device)
        else:
            every = torch.cat(g.all_gather(rows, counts))          # in `order`
            position = torch.empty_like(order)
            position[order] = torch.arange(T * k, device=x.device)
        out = _sum_in_copy_order(every, position.view(T, k), phys)
        if g.timings is not None:
            g.timings.append((busy, time.perf_counter() - start, int(mine.numel())))
        return out


def _sum_in_copy_order(rows: torch.Tensor, position: torch.Tensor, phys: torch.Tensor) -> torch.Tensor:
    """Each token's k rows (token t's assignment j at rows[position[t, j]]) -> [T, D], added in
    ascending copy id, rounding after each add (the single-process op's order)."""
    at = position.gather(1, torch.argsort(phys, dim=1, stable=True))
    out = rows[at[:, 0]]
    for j in range(1, at.shape[1]):
        out += rows[at[:, j]]
    return out
