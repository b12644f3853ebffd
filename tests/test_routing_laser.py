"""LASER's fast scan against the exact one and against the spec written out token by token here:
max/mean load within 2% of the exact scan's (here: the same choices) on every shape, E = 8..128,
k = 2/6/8, skewed and flat gate logits, 1 to 300 tokens."""
import pytest
import torch

from tinymoe.routing import GateRule, RouteContext, make_router
from tinymoe.routing.metrics import imbalance

SHAPES = [(E, k) for E in (8, 32, 64, 128) for k in (2, 6, 8) if k < E]
TOKENS = (1, 2, 3, 5, 17, 64, 100, 257, 300)


def gate_logits(T, E, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "skewed":  # a few hot experts, as trained gates have
        return torch.randn(T, E, generator=g) + 1.5 * torch.randn(E, generator=g)
    return 0.3 * torch.randn(T, E, generator=g)  # near-uniform scores: most tokens flat


def spec_scan(probs, k, c, t_fix, eps_high):
    """The spec, one token after another, on Python floats."""
    E = len(probs[0])
    load = [0] * E
    chosen = []
    for p in probs:
        by_score = sorted(range(E), key=lambda e: -p[e])
        if sum(p[e] for e in by_score[:k]) >= eps_high:
            pick = by_score[:k]
        else:
            pool = by_score[:c]
            kept = [e for e in pool if p[e] >= t_fix * p[pool[0]]]
            kept += [e for e in pool if e not in kept][:max(0, k - len(kept))]
            pick = sorted(kept, key=lambda e: (load[e], -p[e]))[:k]
        for e in pick:
            load[e] += 1
        chosen.append(pick)
    return chosen


def load_of(ids, E):
    return torch.bincount(torch.as_tensor(ids).reshape(-1), minlength=E)


def midpoint_threshold(probs, k):
    """eps_high half way between the two middle top-k masses (float64): about half the tokens
    flat, and no mass near the threshold, so float32 and float64 sums agree on every token."""
    mass = probs.double().topk(k, -1).values.sum(-1).sort().values
    if mass.numel() == 1:
        return float(mass[0]) + 1e-3
    mid = mass.numel() // 2
    return float(mass[mid - 1] + mass[mid]) / 2


@pytest.mark.parametrize("E,k", SHAPES)
@pytest.mark.parametrize("kind", ["skewed", "flat"])
def test_fast_scan_within_two_percent_of_the_exact_scan(E, k, kind):
    rule = GateRule(E, k, True)
    c = min(E, 2 * k)
    flat_seen = 0
    for T in TOKENS:
        logits = gate_logits(T, E, kind, seed=T * 131 + E + k)
        probs = rule.probs(logits)
        eps = midpoint_threshold(probs, k)
        routed = {}
        for exact in (True, False):
            ctx = RouteContext(0, 1, rule)
            ids, w = make_router("laser", eps_high=eps, exact=exact).route(logits, None, ctx)
            torch.testing.assert_close(w, rule.weights(probs, ids), rtol=0, atol=0)
            routed[exact] = ids
        flat_seen += ctx.state["flat"]
        spec = spec_scan(probs.double().tolist(), k, c, 0.3, eps)
        assert [sorted(r) for r in routed[True].tolist()] == [sorted(r) for r in spec], (T, "exact")
        i_exact = imbalance(load_of(routed[True], E))
        i_fast = imbalance(load_of(routed[False], E))
        assert abs(i_fast / i_exact - 1) <= 0.02, (T, i_fast, i_exact)
        assert torch.equal(routed[False], routed[True]), T  # the fast scan makes the same choices
    assert flat_seen > 0


@pytest.mark.parametrize("E,k", [(8, 2), (8, 6), (64, 8), (128, 2)])
def test_fast_scan_with_other_pools_and_the_pass_quantile(E, k):
    # c = E (widest pool), t_fix 0 (nothing dropped) and 1 (only ties with the best stay), and the
    # threshold from the pass's own quantile (no eps_high), skewed and flat
    rule = GateRule(E, k, False)
    for kind in ("skewed", "flat"):
        for T, (c, t_fix, q) in zip((7, 64, 300), ((E, 0.0, 0.5), (k + 1, 1.0, 0.9), (E, 0.3, 0.25))):
            logits = gate_logits(T, E, kind, seed=T + E)
            got = [make_router("laser", c=c, t_fix=t_fix, q=q, exact=exact).route(logits, None, RouteContext(0, 1, rule))[0]
                   for exact in (True, False)]
            assert torch.equal(got[0], got[1]), (kind, T, c, t_fix, q)
