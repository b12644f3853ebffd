"""The `budget` router (docs/routing.md, section 3.1) against the spec written out here: every set
of k experts enumerated, masses as exact fractions, the least-loaded allowed set by its sorted
(load, -p, id) keys, tokens in order."""
from fractions import Fraction
from itertools import combinations

import pytest
import torch

from tinymoe.routing import GateRule, RouteContext, make_router
from tinymoe.routing.budget import budget_fill, budget_pools, budget_scan
from tinymoe.routing.metrics import imbalance


def reference(probs: torch.Tensor, k: int, delta: float) -> list[list[int]]:
    """The scan's spec, one token after another: of the k-sets S with p[S] >= (1 - delta) * M,
    the one whose worst expert is best, then its second worst, ... (experts ranked by (load, -p,
    id)); each row by p descending."""
    E = probs.shape[1]
    load = [0] * E
    keep = 1 - Fraction(delta)
    chosen = []
    for row in probs.tolist():
        p = [Fraction(v) for v in row]
        top = sorted(range(E), key=lambda e: (-p[e], e))[:k]
        M = sum(p[e] for e in top)
        allowed = [S for S in combinations(range(E), k) if sum(p[e] for e in S) >= keep * M]
        best = min(allowed, key=lambda S: sorted(((load[e], -p[e], e) for e in S), reverse=True))
        pick = sorted(best, key=lambda e: (-p[e], e))
        for e in pick:
            load[e] += 1
        chosen.append(pick)
    return chosen


def fill_reference(probs: torch.Tensor, k: int, delta: float) -> list[list[int]]:
    """budget_fill's rule with exact fractions and every move listed: rounds lowering the largest
    load to a level, experts above it giving their excess by the cheapest moves (relative mass
    lost; ties token, from, to), each token once a round, no target above the level; a failed
    round halves the step; the step starts at half the way to the mean load."""
    T, E = probs.shape
    P = [[Fraction(v) for v in row] for row in probs.tolist()]
    on = [set(sorted(range(E), key=lambda e: (-P[t][e], e))[:k]) for t in range(T)]
    M = [sum(P[t][e] for e in on[t]) for t in range(T)]
    keep = 1 - Fraction(delta)
    load = [sum(e in s for s in on) for e in range(E)]
    mean = -(-T * k // E)
    step = max(1, (max(load) - mean) // 2)
    while step > 0:
        level = max(load) - step
        need = {h: load[h] - level for h in range(E) if load[h] > level}
        room = [max(0, level - load[e]) for e in range(E)]
        moves = sorted(((P[t][h] - P[t][e]) / M[t], t, h, e) for t in range(T) for h in sorted(on[t])
                       if h in need for e in range(E) if e not in on[t] and room[e] > 0
                       and sum(P[t][x] for x in on[t]) - P[t][h] + P[t][e] >= keep * M[t])
        owed, moved, taken = dict(need), set(), []
        for _, t, h, e in moves:
            if owed[h] and t not in moved and room[e]:
                owed[h] -= 1
                room[e] -= 1
                moved.add(t)
                taken.append((t, h, e))
        if any(owed.values()):
            step //= 2
            continue
        for t, h, e in taken:
            on[t] = on[t] - {h} | {e}
            load[h] -= 1
            load[e] += 1
        step = max(1, min(step, (max(load) - mean) // 2))
    return [sorted(s, key=lambda e: (-P[t][e], e)) for t, s in enumerate(on)]


def ctx_for(E, k, renormalize=True):
    return RouteContext(0, 1, GateRule(E, k, renormalize))


def gate_logits(T, E, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "skewed":  # a few hot experts, as trained gates have
        return torch.randn(T, E, generator=g) + 1.5 * torch.randn(E, generator=g)
    if kind == "tied":  # few distinct logits: equal probabilities everywhere
        return torch.randint(0, 3, (T, E), generator=g).float()
    return 0.3 * torch.randn(T, E, generator=g)  # near-uniform scores


def load_of(ids, E):
    return torch.bincount(torch.as_tensor(ids).reshape(-1), minlength=E)


def crafted(rows):
    return torch.tensor(rows, dtype=torch.float64).log().float()


def test_fill_hand_worked_example():
    # E=4, k=2, delta=0.2. Top-2 loads [6,5,1,0], mean ceil(12/4) = 3, step (6-3)//2 = 1.
    # Level 5: expert 0 gives one, to expert 2 or 3 (room 4, 5; expert 1 is at the level). Within
    # budget only token 4 can leave 0: 0 -> 2 costs .03/.53, 0 -> 3 .04/.53; take 0 -> 2. Loads
    # [5,5,2,0]. Level 4: experts 0 and 1 must each give one. Token 4 could leave 1 (-> 3), but
    # no token on expert 0 has an allowed move left, so the round fails and the routing stops.
    logits = crafted([
        [0.50, 0.30, 0.10, 0.10],  # {0,1}: any move keeps < .8 of .80
        [0.40, 0.34, 0.22, 0.04],
        [0.45, 0.25, 0.20, 0.10],
        [0.35, 0.30, 0.20, 0.15],
        [0.27, 0.26, 0.24, 0.23],  # M .53: 0 -> 2 keeps .50 >= .424
        [0.34, 0.30, 0.33, 0.03],  # {0,2}
    ])
    probs = torch.softmax(logits, -1)
    ids = budget_fill(probs, 2, 0.2)
    assert ids.tolist() == [[0, 1], [0, 1], [0, 1], [0, 1], [1, 2], [0, 2]] == fill_reference(probs, 2, 0.2)
    ctx = ctx_for(4, 2)
    routed, w = make_router("budget", delta=0.2).route(logits, None, ctx)
    assert torch.equal(routed, ids) and torch.equal(w, ctx.rule.weights(probs, ids))


@pytest.mark.parametrize("E,k", [(4, 2), (8, 2), (10, 3), (16, 4)])
@pytest.mark.parametrize("kind", ["skewed", "flat", "tied"])
def test_fill_equals_its_reference_token_for_token(E, k, kind):
    T = 48 if E <= 10 else 24
    for seed, delta in enumerate((0.05, 0.2, 0.35, 1.0)):
        probs = GateRule(E, k, seed % 2 == 0).probs(gate_logits(T, E, kind, 20 + seed))
        assert budget_fill(probs, k, delta).tolist() == fill_reference(probs, k, delta), (seed, delta)


def test_fill_keeps_every_budget_and_only_lowers_the_maximum():
    logits = gate_logits(2048, 32, "skewed", 6)
    probs = torch.softmax(logits, -1)
    top = probs.topk(6)
    top_max = int(load_of(top.indices, 32).max())
    last = top_max
    for delta in (0.05, 0.2, 0.5, 1.0):
        ids = budget_fill(probs, 6, delta)
        assert all(len(set(r)) == 6 for r in ids.tolist())
        kept = probs.double().gather(1, ids).sum(-1)
        assert bool((kept >= (1 - delta) * top.values.double().sum(-1) - 1e-12).all())
        now = int(load_of(ids, 32).max())
        assert now <= last
        last = now
    assert last <= -(-2048 * 6 // 32) + 1 < top_max  # every set allowed: down to the mean


def test_hand_worked_example():
    # E=4, k=2, delta=0.2: a set may keep as little as 0.8 M. Worked by hand, token by token:
    logits = crafted([
        [0.50, 0.30, 0.10, 0.10],  # loads 0: the top-2 {0,1}; L=[1,1,0,0]
        [0.40, 0.34, 0.22, 0.04],  # M=.74 >= .592: {0,1} or {0,2}; 2 (L=0) beats 1 (L=1); L=[2,1,1,0]
        [0.45, 0.25, 0.20, 0.10],  # M=.70 >= .56: {0,1} or {0,2}; 1 and 2 at L=1, 1 by p; L=[3,2,1,0]
        [0.35, 0.30, 0.20, 0.15],  # M=.65 >= .52: {0,1} or {0,2}; 2 (L=1) beats 1 (L=2); L=[4,2,2,0]
        [0.27, 0.26, 0.24, 0.23],  # every pair allowed: 3 (L=0), then 1 over 2 by p; L=[4,3,2,1]
        [0.60, 0.20, 0.15, 0.05],  # M=.8 >= .64: 0 with any; 3 (L=1) best; L=[5,3,2,2]
    ])
    expected = [[0, 1], [0, 2], [0, 1], [0, 2], [1, 3], [0, 3]]
    ctx = ctx_for(4, 2)
    ids, w = make_router("budget", delta=0.2, method="scan").route(logits, None, ctx)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == expected == reference(probs, 2, 0.2)
    torch.testing.assert_close(w, ctx.rule.weights(probs, ids))
    assert load_of(ids, 4).max() == 5 < load_of(probs.topk(2).indices, 4).max() == 6


def test_the_mass_constraint_is_exact_at_its_boundary():
    # dyadic probabilities, exact in fp32: token 1's {0,3} keeps exactly 0.75 M at delta=0.25
    probs = torch.tensor([[0.0625, 0.5, 0.25, 0.1875],   # top-2 {1,2}; L=[0,1,1,0]
                          [0.5, 0.25, 0.1875, 0.0625]])  # M=.75; {0,3}=.5625 = .75 M, loads 0
    for delta, second in ((0.25, [0, 3]), (0.2499, [0, 1])):  # just below: {0,1} (1 beats 2 by p)
        ids = budget_scan(*budget_pools(probs, 2, delta), 2, 4, delta)
        assert ids.tolist() == [[1, 2], second] == reference(probs, 2, delta)


@pytest.mark.parametrize("E,k", [(4, 2), (8, 2), (10, 3), (12, 4)])
@pytest.mark.parametrize("kind", ["skewed", "flat", "tied"])
def test_fast_scan_equals_the_reference_token_for_token(E, k, kind):
    T = 40 if E <= 10 else 12
    for seed, delta in enumerate((0.03, 0.1, 0.3, 1.0)):
        logits = gate_logits(T, E, kind, seed)
        ctx = ctx_for(E, k, renormalize=seed % 2 == 0)
        ids, w = make_router("budget", delta=delta, method="scan").route(logits, None, ctx)
        probs = ctx.rule.probs(logits)
        assert ids.tolist() == reference(probs, k, delta), (seed, delta)
        assert torch.equal(w, ctx.rule.weights(probs, ids))


def test_delta_zero_is_topk_exactly():
    for kind in ("skewed", "tied"):
        logits = gate_logits(300, 8, kind, 1)
        for renormalize in (True, False):
            ctx = ctx_for(8, 2, renormalize)
            b = make_router("topk").route(logits, None, ctx)
            for method in ("fill", "scan"):
                a = make_router("budget", delta=0, method=method).route(logits, None, ctx)
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # and the scan itself, where the top-k is unique (no tied p), keeps every token's top-k
    probs = torch.softmax(gate_logits(300, 16, "flat", 2), -1)
    ids = budget_scan(*budget_pools(probs, 4, 0.0), 4, 16, 0.0)
    assert torch.equal(ids, probs.topk(4).indices)


def test_delta_one_is_the_balanced_bound():
    logits = gate_logits(200, 8, "skewed", 3)
    a, _ = make_router("budget", delta=1, method="scan").route(logits, None, ctx_for(8, 2))
    b, _ = make_router("balanced").route(logits, None, ctx_for(8, 2))
    assert [set(r) for r in a.tolist()] == [set(r) for r in b.tolist()]


def test_every_choice_keeps_its_share_and_balance_grows_with_delta():
    logits = gate_logits(512, 32, "skewed", 4)
    probs = torch.softmax(logits, -1).double()
    top_mass = probs.topk(6).values.sum(-1)
    last = imbalance(load_of(probs.topk(6).indices, 32))
    for delta in (0.02, 0.1, 0.3):
        ids, _ = make_router("budget", delta=delta, method="scan").route(logits, None, ctx_for(32, 6, False))
        assert bool((probs.gather(1, ids).sum(-1) >= (1 - delta) * top_mass - 1e-9).all())
        assert all(len(set(r)) == 6 for r in ids.tolist())
        now = imbalance(load_of(ids, 32))
        assert now < last
        last = now


def test_delta_option_is_checked():
    with pytest.raises(ValueError) as e:
        make_router("budget", delta=1.5)
    assert str(e.value) == "router 'budget' option delta must be a number in [0, 1], got 1.5"
    assert make_router("budget", delta="0.05").delta == 0.05
    with pytest.raises(ValueError, match="method"):
        make_router("budget", method="greedy")


def test_budget_through_the_model():
    import tinymoe
    from tinymoe.routing import install
    model = tinymoe.load_model("tiny", dtype="float32")
    ids = torch.randint(4, 4000, (4, 24), generator=torch.Generator().manual_seed(0))
    install(model, "topk")
    with torch.no_grad():
        ref = model(ids)
        install(model, "budget", delta=0)
        assert torch.equal(model(ids), ref)
        install(model, "budget", delta=0.5)
        out = model(ids)
    install(model, "topk")
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
