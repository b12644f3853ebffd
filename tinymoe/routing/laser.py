"""LASER (docs/routing.md, section 3): top-k when the scores are decisive, else the least-loaded
members of a wide pool of good experts. Loads count this forward pass of this layer only."""
import torch

from .base import Option, Router, register


def top_mass(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the k largest probabilities per token, [T]."""
    return probs.topk(k, dim=-1).values.sum(-1)


def candidate_pools(probs: torch.Tensor, k: int, c: int, t_fix: float):
    """The c best experts per token by score, and which of them stay in the pool: those with
    p >= t_fix * max p, refilled in score order up to k. Returns (pool [T,c], valid [T,c])."""
    vals, pool = probs.topk(c, dim=-1)
    return pool, kept(vals, k, t_fix)


def kept(vals: torch.Tensor, k: int, t_fix: float) -> torch.Tensor:
    """Which of the pool's scores `vals` [T,c] (descending) stay: a prefix of each row."""
    keep = (vals >= t_fix * vals[:, :1]).sum(-1, keepdim=True).clamp(min=k)
    return torch.arange(vals.shape[1], device=vals.device) < keep


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


def greedy_fast(pool, valid, flat, k: int, num_experts: int) -> torch.Tensor:
    """The same scan as `greedy_reference`, with the same result, in less time: plain lists, one
    integer key per pool member (load * c + position, so ties go to the higher score); `valid`
    must be a prefix of each pool, as `candidate_pools` makes it. Loads are never approximated: the spec allows 2%
    off the reference's max/mean, but with max loads under ~50 (most decode passes) that is less
    than one assignment, and chunked load updates were measured both slower and off by up to 40%."""
    c = pool.shape[1]
    load = [0] * num_experts
    chosen = []
    for members, size, is_flat in zip(pool.tolist(), valid.sum(-1).tolist(), flat.tolist()):
        if is_flat:
            keys = sorted([load[members[j]] * c + j for j in range(size)])[:k]
            pick = [members[key % c] for key in keys]
        else:
            pick = members[:k]
        for e in pick:
            load[e] += 1
        chosen.append(pick)
    return torch.tensor(chosen, dtype=torch.int64, device=pool.device).view(-1, k)


@register("laser")
class Laser(Router):
    """Options: eps_high (top-k-mass threshold; default the calibrated quantile q of this layer),
    q, t_fix, c (pool size, default min(E, 2k)), exact (the per-token reference scan)."""
    OPTIONS = {"eps_high": Option("number", None, lo=0, hi=1), "q": Option("number", 0.5, lo=0, hi=1),
               "t_fix": Option("number", 0.3, lo=0, hi=1), "c": Option("integer", None, lo="k", hi="E"),
               "exact": Option("bool", False)}

    def setup(self):
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
        if self.c is None:
            c = min(E, 2 * k)
        elif k <= self.c <= E:
            c = self.c
        else:  # `install` checks this before any forward; a router used without it lands here
            self.check_layer(ctx)
        probs = rule.probs(logits)
        # one topk for both the mass and the pool (a second one cost as much as the scan at 2048
        # tokens); a contiguous copy sums the same values in the same order as top_mass
        vals, pool = probs.topk(c, dim=-1)
        mass = vals[:, :k].contiguous().sum(-1)
        flat = mass < self.threshold(mass)
        if probs.shape[0] == 1:  # one token (batch-1 decode): every load is zero, so the scan
            ids = pool[:, :k]    # picks the pool's first k, flat or not
        else:
            scan = greedy_reference if self.exact else greedy_fast
            ids = scan(pool, kept(vals, k, self.t_fix), flat, k, E)
        ctx.state["flat"] = ctx.state.get("flat", 0) + int(flat.sum())
        ctx.state["tokens"] = ctx.state.get("tokens", 0) + flat.numel()
        return ids, rule.weights(probs, ids)


def quantile_from_grid(grid: torch.Tensor, q: float) -> float:
    """Quantile q read off values stored at evenly spaced levels 0, 1/(n-1), ..., 1."""
    x = q * (grid.numel() - 1)
    lo = int(x)
    hi = min(lo + 1, grid.numel() - 1)
    return float(grid[lo] + (x - lo) * (grid[hi] - grid[lo]))
