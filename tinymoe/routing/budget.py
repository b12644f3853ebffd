"""Budget routing (docs/routing.md, section 3.1): a token may leave its top-k only for a set of k
experts that keeps at least (1 - delta) of its top-k mass. Two ways to spend that budget: `fill`
starts from the top-k and lowers the pass's largest load by the cheapest moves; `scan` gives each
token in turn its least-loaded allowed set. Loads count this forward pass of this layer only, as
LASER's do."""
from fractions import Fraction

import torch

from .base import Option, Router, register
from .topk import TopK

# Every fp32 value in [0, 1] is an integer multiple of 2^-149, so masses scaled by 2^149 are exact
# Python integers: the mass constraint is decided without rounding, the same way by every scan.
SCALE = 2.0 ** 149


def budget_pools(probs: torch.Tensor, k: int, delta: float):
    """Each token's experts by p, descending (ties: the lower id first), and how many of them can be
    in an allowed set: those with p >= p_k - delta * M (p_k the k-th largest p, M the top-k mass).
    The cut is taken a little wide against float64 rounding; an expert in no allowed set is never
    kept by the scan, so the extra ones change nothing. Returns (order [T,c], probs [T,c], sizes [T])."""
    vals, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    v64 = vals.double()
    bound = v64[:, k - 1] - delta * v64[:, :k].sum(-1) - 1e-12
    sizes = (v64 >= bound[:, None]).sum(-1)
    c = int(sizes.max())
    return order[:, :c], vals[:, :c], sizes


def budget_scan(order, vals, sizes, k: int, num_experts: int, delta: float) -> torch.Tensor:
    """Tokens in order, each taking its least-loaded allowed set, loads growing before the next.
    With a token's experts ranked by (load, -p, id) (smaller is better), that set is the allowed
    set whose worst expert is best, then whose second worst is, and so on. It is what is left
    after going through the experts from worst to best, dropping each one unless every allowed
    set left contains it. Only the best k left (`top`) can be needed, so an expert outside them is
    dropped at no cost and one inside is checked on one mass: top's with it replaced by the best
    expert left outside. Returns ids [T,k], each row by p descending."""
    num, den = Fraction(delta).as_integer_ratio()  # allowed: den * mass >= (den - num) * M
    load = [0] * num_experts
    chosen = []
    for members, values, size in zip(order.tolist(), vals.tolist(), sizes.tolist()):
        if size > k:
            cur = sum(int(v * SCALE) for v in values[:k])  # top's mass, exactly
            least = (den - num) * cur
            top, nxt, left = set(range(k)), k, size  # positions by p; nxt: the best one outside top
            dead = [False] * size
            # worst first: one integer key per position, load then position
            for key in sorted([load[e] * size + j for j, e in enumerate(members[:size])], reverse=True):
                if left == k:
                    break
                j = key % size
                if j in top:
                    new = cur - int(values[j] * SCALE) + int(values[nxt] * SCALE)
                    if new * den < least:
                        continue  # every allowed set left holds j
                    top.remove(j)
                    top.add(nxt)
                    cur = new
                elif j != nxt:
                    dead[j] = True
                    left -= 1
                    continue
                dead[j] = True
                left -= 1
                nxt += 1
                while nxt < size and dead[nxt]:
                    nxt += 1
            pick = [members[j] for j in sorted(top)]
        else:  # only the top-k is allowed
            pick = members[:k]
        for e in pick:
            load[e] += 1
        chosen.append(pick)
    return torch.tensor(chosen, dtype=torch.int64, device=order.device).view(-1, k)


def cheapest_moves(cost, need: list[int], room: list[int], toks, hot):
    """One round of budget_fill. cost [n, H, E]: moving token toks[i] from expert hot[h] to e (inf
    where not allowed). Going through the allowed moves by cost (ties: token, from, to), a move is
    taken while its source still owes, its token has not moved this round and its target has
    room. Returns the moves, or None unless every source paid. Each source's few cheapest moves
    usually decide the round, so those are tried first; a source's later moves come after all of
    them in the order, so the answer is the same as over every move."""
    n, H, E = cost.shape
    by_source = cost.permute(1, 0, 2).reshape(H, n * E)
    few = (torch.tensor(need, device=cost.device) + 3).clamp(max=n * E)
    bound = by_source.sort(dim=1).values.gather(1, few[:, None] - 1).view(1, H, 1)
    for keep in ((cost <= bound) & torch.isfinite(cost), torch.isfinite(cost)):
        i, h, e = keep.nonzero(as_tuple=True)  # in (token, from, to) order
        order = torch.sort(cost[i, h, e], stable=True).indices
        owed, moved, left, taken = list(need), set(), list(room), []
        for t, s, src, dst in torch.stack((toks[i], h, hot[h], e), 1)[order].tolist():
            if owed[s] == 0 or t in moved or left[dst] == 0:
                continue
            owed[s] -= 1
            left[dst] -= 1
            moved.add(t)
            taken.append((t, src, dst))
            if len(taken) == sum(need):
                return taken
    return None


def budget_fill(probs: torch.Tensor, k: int, delta: float) -> torch.Tensor:
    """From the top-k, rounds that lower the pass's largest load m to a level m - s: every expert
    above the level hands its excess tokens to experts below it (none rising above it), by the
    cheapest moves first (mass lost over the token's top-k mass; ties to the lower token, then
    from-, then to-expert), a token moving at most once a round and only within its budget. A
    round that cannot finish is not applied and s halves; the routing stops when a round of s = 1
    fails, so mass is spent only where it lowers the maximum. s starts at half the way from m to
    the mean load. Masses are float64 sums of fp32 probabilities (exact for these few terms).
    Returns ids [T,k], each row by p descending (ties: the lower id)."""
    T, E = probs.shape
    p = probs.double()
    vals, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    on = torch.zeros(T, E, dtype=torch.bool, device=probs.device)
    on.scatter_(1, order[:, :k], True)
    top_mass = vals[:, :k].double().sum(-1)
    load = on.sum(0)
    mean = -(-T * k // E)  # the largest load is never below it
    step = max(1, (int(load.max()) - mean) // 2)
    while step > 0:
        level = int(load.max()) - step
        hot = (load > level).nonzero().flatten()
        room = (level - load).clamp(min=0)
        toks = on[:, hot].any(1).nonzero().flatten()
        pt, ont, M = p[toks], on[toks], top_mass[toks, None, None]
        ph = pt[:, hot, None]  # [n, H, 1]
        kept = (pt * ont).sum(-1)[:, None, None] - ph + pt[:, None, :]  # the set's mass after the move
        ok = ont[:, hot, None] & (room > 0) & ~ont[:, None, :] & (kept >= (1 - delta) * M)
        cost = torch.where(ok, (ph - pt[:, None, :]) / M, torch.inf)
        taken = cheapest_moves(cost, (load[hot] - level).tolist(), room.tolist(), toks, hot)
        if taken is None:
            step //= 2
            continue
        t, src, dst = torch.tensor(taken, dtype=torch.long, device=probs.device).unbind(1)
        on[t, src], on[t, dst] = False, True
        load += torch.bincount(dst, minlength=E) - torch.bincount(src, minlength=E)
        step = max(1, min(step, (int(load.max()) - mean) // 2))
    return torch.sort(torch.where(on, probs, -1.0), dim=-1, descending=True, stable=True).indices[:, :k]


@register("budget")
class Budget(Router):
    """Options: delta, the share of its top-k mass a token may give up for balance (0: top-k);
    method, how the budget is spent (fill: the cheapest moves off the most loaded experts; scan:
    each token in turn takes its least-loaded allowed set)."""
    OPTIONS = {"delta": Option("number", 0.35, lo=0, hi=1),
               "method": Option("choice", "fill", choices=("fill", "scan"))}

    def setup(self):
        self.topk = TopK()

    def route(self, logits, hidden, ctx):
        rule = ctx.rule
        k = rule.top_k
        if self.delta == 0:  # the model's own top-k, its tie order included
            return self.topk.route(logits, hidden, ctx)
        probs = rule.probs(logits)
        if self.method == "fill":
            ids = budget_fill(probs, k, self.delta)
        else:
            ids = budget_scan(*budget_pools(probs, k, self.delta), k, rule.num_experts, self.delta)
        return ids, rule.weights(probs, ids)
