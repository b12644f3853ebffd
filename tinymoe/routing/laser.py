"""LASER (ALGORITHMS.md section 2): top-k when the scores are decisive, else the least-loaded
members of a wide pool of good experts. Loads count this forward pass of this layer only."""
import torch

from .base import Router, register


def top_mass(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the k largest probabilities per token, [T]."""
    return probs.topk(k, dim=-1).values.sum(-1)


def candidate_pools(probs: torch.Tensor, k: int, c: int, t_fix: float):
    """The c best experts per token by score, and which of them stay in the pool: those with
    p >= t_fix * max p, refilled in score order up to k. Returns (pool [T,c], valid [T,c])."""
    vals, pool = probs.topk(c, dim=-1)
    keep = (vals >= t_fix * vals[:, :1]).sum(-1, keepdim=True).clamp(min=k)
    valid = torch.arange(c, device=probs.device) < keep
    return pool, valid


def greedy_reference(pool, valid, flat, k: int, num_experts: int) -> torch.Tensor:
    """The exact per-token scan: peaked tokens take their top-k, flat ones the k pool members of
    least current load (ties to the higher score), and loads grow before the next token."""
    load = [0] * num_experts
    chosen = []
    for members, ok, is_flat in zip(pool.tolist(), valid.tolist(), flat.tolist()):
        if is_flat:
            cand = [(load[e], pos, e) for pos, (e, v) in enumerate(zip(members, ok)) if v]
            pick = [e for _, _, e in sorted(cand)[:k]]
        else:
            pick = members[:k]
        for e in pick:
            load[e] += 1
        chosen.append(pick)
    return torch.tensor(chosen, dtype=torch.int64, device=pool.device).view(-1, k)


def greedy_chunked(pool, valid, flat, k: int, num_experts: int, chunk: int = 32) -> torch.Tensor:
    """The fast variant: loads are updated once per chunk of tokens. Inside a chunk a flat token
    sees, besides the loads so far, the expected load of the chunk's earlier flat tokens (each
    spreads k over its pool); this stops them all herding onto the same least-loaded experts."""
    T, c = pool.shape
    dev = pool.device
    ids = pool[:, :k].clone()
    load = torch.zeros(num_experts, device=dev)
    for s in range(0, T, chunk):
        f = flat[s:s + chunk]
        load += torch.bincount(ids[s:s + chunk][~f].reshape(-1), minlength=num_experts)
        if not f.any():
            continue
        p, v = pool[s:s + chunk][f], valid[s:s + chunk][f]
        member = torch.zeros(p.shape[0], num_experts, device=dev).scatter_(1, p, v.float())
        spread = member * (k / v.sum(-1, keepdim=True))
        before = spread.cumsum(0) - spread  # expected load of earlier flat tokens in the chunk
        key = (load + before).gather(1, p).masked_fill(~v, float("inf"))
        order = torch.sort(key, dim=-1, stable=True).indices[:, :k]  # stable: ties to higher score
        pick = p.gather(1, order)
        rows = torch.nonzero(f).squeeze(1) + s
        ids[rows] = pick
        load += torch.bincount(pick.reshape(-1), minlength=num_experts)
    return ids


@register("laser")
class Laser(Router):
    """Options: eps_high (top-k-mass threshold; default the calibrated quantile q of this layer),
    q, t_fix, c (pool size, default min(E, 2k)), exact (the per-token reference scan), chunk."""

    def __init__(self, eps_high: float | None = None, q: float = 0.5, t_fix: float = 0.3,
                 c: int | None = None, exact: bool = False, chunk: int = 32):
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"laser: q must be in [0, 1], got {q}")
        if c is not None and c < 1:
            raise ValueError(f"laser: c must be >= 1, got {c}")
        self.eps_high, self.q, self.t_fix, self.c = eps_high, q, t_fix, c
        self.exact, self.chunk = bool(exact), int(chunk)
        self.calibrated = None

    def attach(self, block, calib):
        if self.eps_high is None and calib is not None and "mass_quantiles" in calib:
            self.calibrated = quantile_from_grid(calib["mass_quantiles"], self.q)

    def threshold(self, mass: torch.Tensor) -> float:
        if self.eps_high is not None:
            return float(self.eps_high)
        if self.calibrated is not None:
            return self.calibrated
        # The project's fallback without a calibration file: the quantile over this pass's tokens
        # (of one token: its own mass, without torch.quantile's cost).
        return float(mass) if mass.numel() == 1 else float(torch.quantile(mass, self.q))

    def route(self, logits, hidden, ctx):
        rule = ctx.rule
        E, k = rule.num_experts, rule.top_k
        c = min(E, max(k, self.c or 2 * k))
        probs = rule.probs(logits)
        if probs.shape[0] == 1:  # one token (batch-1 decode): every load is zero, so the scan
            # picks the pool's first k, flat or not; the same picks and counts in a few ops
            vals, pool = probs.topk(c, dim=-1)
            mass = vals[:, :k].sum(-1)  # = top_mass: the same values in the same order
            flat = mass < self.threshold(mass)
            ids = pool[:, :k]
        else:
            mass = top_mass(probs, k)
            flat = mass < self.threshold(mass)
            pool, valid = candidate_pools(probs, k, c, self.t_fix)
            if self.exact:
                ids = greedy_reference(pool, valid, flat, k, E)
            else:
                ids = greedy_chunked(pool, valid, flat, k, E, self.chunk)
        ctx.state["flat"] = ctx.state.get("flat", 0) + int(flat.sum())
        ctx.state["tokens"] = ctx.state.get("tokens", 0) + flat.numel()
        return ids, rule.weights(probs, ids)


def quantile_from_grid(grid: torch.Tensor, q: float) -> float:
    """Quantile q read off values stored at evenly spaced levels 0, 1/(n-1), ..., 1."""
    x = q * (grid.numel() - 1)
    lo = int(x)
    hi = min(lo + 1, grid.numel() - 1)
    return float(grid[lo] + (x - lo) * (grid[hi] - grid[lo]))
