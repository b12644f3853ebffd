"""Budget routing (docs/routing.md, section 3.1): a token may leave its top-k only for a set of k
experts that keeps at least (1 - delta) of its top-k mass, and only when one of its top-k experts
already holds its capacity share of the pass; it then takes the least loaded of those sets. Loads
count this forward pass of this layer only, as LASER's do."""
import math
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


def capacity_limit(tokens: int, k: int, num_experts: int, capacity: float) -> int:
    """Assignments an expert takes before its tokens start to look elsewhere: `capacity` times the
    mean load of the pass, rounded up (0: none, every token takes its least-loaded allowed set)."""
    return math.ceil(capacity * tokens * k / num_experts - 1e-9)


def budget_scan(order, vals, sizes, k: int, num_experts: int, delta: float, cap: int = 0) -> torch.Tensor:
    """Tokens in order, each keeping its top-k while all of its top-k experts hold fewer than `cap`
    assignments, and otherwise taking its least-loaded allowed set, loads growing before the next.
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
        if size > k and max(load[e] for e in members[:k]) >= cap:
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
        else:  # only the top-k is allowed, or it still has room
            pick = members[:k]
        for e in pick:
            load[e] += 1
        chosen.append(pick)
    return torch.tensor(chosen, dtype=torch.int64, device=order.device).view(-1, k)


@register("budget")
class Budget(Router):
    """Options: delta, the share of its top-k mass a token may give up for balance (0: top-k);
    capacity, the multiple of the pass's mean load an expert takes before its tokens may move
    (0: they move whenever a less-loaded allowed set exists)."""
    OPTIONS = {"delta": Option("number", 0.2, lo=0, hi=1), "capacity": Option("number", 0.0, lo=0)}

    def setup(self):
        self.topk = TopK()

    def route(self, logits, hidden, ctx):
        rule = ctx.rule
        k = rule.top_k
        if self.delta == 0:  # the model's own top-k, its tie order included
            return self.topk.route(logits, hidden, ctx)
        probs = rule.probs(logits)
        cap = capacity_limit(probs.shape[0], k, rule.num_experts, self.capacity)
        ids = budget_scan(*budget_pools(probs, k, self.delta), k, rule.num_experts, self.delta, cap)
        return ids, rule.weights(probs, ids)
