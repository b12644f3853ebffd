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

Two combines, the same result: `allgather` (each rank's rows, padded to the largest rank's
count; every rank knows every rank's count from the routing, so no sizes are exchanged) and
`allreduce` (each rank's rows in a zeroed [T, k, D], summed: exact, as every element is non-zero
on one rank at most; twice the bytes, one collective without padding). `auto` picks by the
number of assignments (`bench/ep.py` measures both).
"""
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..kernels.moe_op import moe_experts
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

    def __post_init__(self):
        if self.combine not in COMBINES:
            raise ValueError(f"unknown combine {self.combine!r}; valid: {', '.join(COMBINES)}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside a group of {self.world}")


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
            dist.barrier(group=g.pg)  # (routing, attention) is replicated, not the straggler
        start = time.perf_counter()
        T, k = phys.shape
        D = x.shape[1]
        owner = copy_rank[phys]                                    # [T, k]
        flat_owner = owner.reshape(-1)
        mine = (flat_owner == g.rank).nonzero().flatten()        # this rank's assignments, token-major
        if mine.numel():
            local = local_index[phys.reshape(-1)[mine]]
            rows = moe_experts(x[mine // k], local[:, None], weights.reshape(-1)[mine][:, None], local_copies)
        else:  # no assignment here this pass: nothing to compute, an empty share of the combine
            rows = x.new_zeros(0, D)
        busy = time.perf_counter() - start
        counts = torch.bincount(flat_owner, minlength=g.world)
        method = g.combine
        if method == "auto":
            method = "allreduce" if T * k < ALLREDUCE_BELOW else "allgather"
        terms = torch.zeros(T * k, D, dtype=x.dtype, device=x.device)
        if method == "allreduce":
            terms[mine] = rows
            dist.all_reduce(terms, group=g.pg)
        else:
            width = int(counts.max())
            padded = torch.zeros(width, D, dtype=x.dtype, device=x.device)
            padded[:rows.shape[0]] = rows
            gathered = [torch.empty_like(padded) for _ in range(g.world)]
            dist.all_gather(gathered, padded, group=g.pg)
            order = torch.argsort(flat_owner, stable=True)         # rank-major, token-major within a rank
            terms[order] = torch.cat([part[:n] for part, n in zip(gathered, counts.tolist())])
        out = _sum_in_copy_order(terms.view(T, k, D), phys)
        if g.timings is not None:
            g.timings.append((busy, time.perf_counter() - start, int(mine.numel())))
        return out


def _sum_in_copy_order(terms: torch.Tensor, phys: torch.Tensor) -> torch.Tensor:
    """terms [T, k, D] -> [T, D]: each token's terms added in ascending copy id, rounding after
    each add (the single-process op's order)."""
    order = torch.argsort(phys, dim=1, stable=True)
    terms = terms.gather(1, order[:, :, None].expand_as(terms))
    out = terms[:, 0].clone()
    for j in range(1, terms.shape[1]):
        out += terms[:, j]
    return out
