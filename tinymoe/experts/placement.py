"""Which rank holds each physical expert copy under expert parallelism (pure functions).

- `contiguous`: copy i on rank i // ceil(P / G); with the default plan, E/G consecutive experts
  a rank.
- `eplb` (after DeepSeek's EPLB): first `redundant` full-precision replicas, each added to the
  expert with the largest expected load per copy `n[e] / copies[e]` (calibrated loads `n`),
  then every copy packed by that expected load.
- A plan that already has replicas (R&Q's) is packed the same way under either placement, so
  its replicas spread over the ranks.

Packing: copies heaviest first, each onto the lightest rank that has room (at most ceil(P / G)
copies a rank, so the ranks hold equal numbers) and, when such a rank exists, no copy of the
same expert yet (two copies of one expert on one rank balance nothing). Ties go to the lower
rank, so every rank computes the same placement.
"""
import torch

from .plan import Copy, ExpertPlan

PLACEMENTS = ("contiguous", "eplb")


def parse_placement(spec: str) -> tuple[str, int | None]:
    """"contiguous", "eplb" or "eplb:R" (R redundant copies a layer) -> (name, R or None)."""
    name, _, extra = str(spec).partition(":")
    if name not in PLACEMENTS:
        raise ValueError(f"unknown placement {spec!r}; valid: contiguous, eplb, eplb:R (R redundant experts a layer)")
    if not extra:
        return name, None
    if name != "eplb" or not extra.isdigit():
        raise ValueError(f"bad placement {spec!r}: only eplb takes a count, as eplb:R with R a whole number")
    return name, int(extra)


def contiguous(num_copies: int, ranks: int) -> list[int]:
    per = -(-num_copies // ranks)
    return [i // per for i in range(num_copies)]


def expected_copy_loads(plan: ExpertPlan, load) -> list[float]:
    """Tokens each copy is expected to serve: its expert's load shared by the expert's copies."""
    counts = {}
    for c in plan.copies:
        counts[c.expert] = counts.get(c.expert, 0) + 1
    return [float(load[c.expert]) / counts[c.expert] for c in plan.copies]


def pack(weight: list[float], expert: list[int], ranks: int) -> list[int]:
    """Rank of each copy: heaviest first onto the lightest rank with room, avoiding ranks that
    already hold its expert (module doc)."""
    cap = -(-len(weight) // ranks)
    rank_of = [0] * len(weight)
    total, count = [0.0] * ranks, [0] * ranks
    holds = [set() for _ in range(ranks)]
    for i in sorted(range(len(weight)), key=lambda i: (-weight[i], i)):
        room = [g for g in range(ranks) if count[g] < cap]
        fresh = [g for g in room if expert[i] not in holds[g]] or room
        g = min(fresh, key=lambda g: (total[g], g))
        rank_of[i] = g
        total[g] += weight[i]
        count[g] += 1
        holds[g].add(expert[i])
    return rank_of


def add_replicas(plan: ExpertPlan, load, redundant: int) -> ExpertPlan:
    """`redundant` more full-precision copies, each to the expert of largest load per copy."""
    copies = list(plan.copies)
    per = {}
    for c in copies:
        per[c.expert] = per.get(c.expert, 0) + 1
    for _ in range(redundant):
        e = max(sorted(per), key=lambda e: float(load[e]) / per[e])
        copies.append(Copy(e, "full"))
        per[e] += 1
    return ExpertPlan(copies)


def place(plan: ExpertPlan, ranks: int, how: str = "contiguous", load=None) -> ExpertPlan:
    """The plan with every copy's `device` set to its rank. `load` [E] (calibrated tokens per
    expert) is needed by eplb and used to pack a plan with replicas; eplb adds R replicas
    ("eplb:R"; "eplb": one a rank)."""
    name, redundant = parse_placement(how)
    if len(plan.copies) < ranks:
        raise ValueError(f"expert parallelism over {ranks} ranks needs at least {ranks} expert copies a layer, "
                         f"not {len(plan.copies)}")
    num_experts = len({c.expert for c in plan.copies})
    if name == "eplb":
        if load is None:
            raise ValueError("the eplb placement needs calibrated expert loads: pass a calibration file "
                             "(tinymoe calibrate MODEL --data FILE --out calib.safetensors; --calib calib.safetensors)")
        if len(plan.copies) == num_experts:
            plan = add_replicas(plan, load, ranks if redundant is None else redundant)
    if len(plan.copies) > num_experts and load is not None:
        rank_of = pack(expected_copy_loads(plan, load), [c.expert for c in plan.copies], ranks)
    else:
        rank_of = contiguous(len(plan.copies), ranks)
    return ExpertPlan([Copy(c.expert, c.precision, g) for c, g in zip(plan.copies, rank_of)])


def device_of(plan: ExpertPlan) -> torch.Tensor:
    """[P] int64: the rank of each copy."""
    return torch.tensor([c.device for c in plan.copies], dtype=torch.int64)
