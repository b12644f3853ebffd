"""Map the router's logical expert ids to physical copies.

Each (token, expert) assignment goes to the copy of its expert with the fewest tokens so far in
this pass, ties to the full-precision copy (then the lower copy index). Every pass starts with
all copies empty, so that greedy rule is exactly round robin over the copies in tie order:
the j-th assignment of expert e (in token-major order) goes to copy `j mod R_e`. That makes it a
few vectorised ops instead of a loop over tokens.
"""
import torch

from .plan import ExpertPlan


def copy_table(plan: ExpertPlan, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (copies [E, R] int64, each row the expert's copies in tie order, padded; counts [E])."""
    rows = [sorted(plan.copies_of(e), key=lambda c: (plan.copies[c].precision != "full", c))
            for e in range(num_experts)]
    missing = [e for e, r in enumerate(rows) if not r]
    if missing:
        raise ValueError(f"expert plan has no copy of experts {missing}")
    width = max(len(r) for r in rows)
    table = torch.tensor([r + [r[0]] * (width - len(r)) for r in rows], dtype=torch.int64)
    return table, torch.tensor([len(r) for r in rows], dtype=torch.int64)


def assign_copies(ids: torch.Tensor, table: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """ids [T, k] logical -> [T, k] physical copy ids."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    per_expert = torch.bincount(flat, minlength=table.shape[0])
    first = torch.cumsum(per_expert, 0) - per_expert
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(flat.numel(), device=flat.device) - first[flat[order]]
    return table[flat, rank % counts[flat]].reshape(ids.shape)


def copy_loads(load: torch.Tensor, table: torch.Tensor, counts: torch.Tensor, num_copies: int) -> torch.Tensor:
    """Assignments per physical copy [num_copies] in a pass whose logical loads are `load` [E]:
    what `assign_copies` does with any ids of those loads (an expert's copies are filled round
    robin, so only its total matters), run on one such order."""
    load = torch.as_tensor(load)
    ids = torch.repeat_interleave(torch.arange(load.numel(), device=table.device), load.long().to(table.device))
    phys = assign_copies(ids, table, counts)
    return torch.bincount(phys, minlength=num_copies).to(load.dtype)
