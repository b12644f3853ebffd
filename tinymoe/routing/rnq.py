"""Replicate-and-Quantize (docs/routing.md, section 5): replicate heavy-hitter experts in a lower
precision and pay for the replicas by quantising unimportant experts, within the layer's
original weight bytes. The router's choice is the base router's; the plan changes only which
physical copy serves each assignment (see `physical_loads` in metrics.py)."""
import torch

from ..experts.plan import PRECISIONS, Copy, ExpertPlan
from .base import Option, Router, register

# The storage formats of tinymoe/experts (quant.py, pools.py), mirrored here because routing may
# only import experts.plan (a test checks the two agree): int8 has one bf16 scale per output
# channel; int4 pads inputs to a multiple of 32 and output channels to a multiple of 64 (the CPU
# kernel's packing), with a bf16 scale and zero per group of inputs (the largest power of two
# from 128 down to 32 dividing the padded K). w1 and w3 are stored as one [2I, D] matrix.
SCALE_BYTES = 2


def int4_group(k: int) -> int:
    g = 128
    while g > 32 and (k % g or g > k):
        g //= 2
    return g


def matrix_bytes(rows: int, cols: int, precision: str, full_itemsize: int) -> int:
    if precision == "full":
        return rows * cols * full_itemsize
    if precision == "int8":
        return rows * cols + rows * SCALE_BYTES
    if precision == "int4":
        rows, cols = -(-rows // 64) * 64, -(-cols // 32) * 32
        return rows * cols // 2 + (cols // int4_group(cols)) * rows * 2 * SCALE_BYTES
    raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")


def expert_bytes(hidden: int, inter: int, precision: str, full_itemsize: int) -> int:
    """One SwiGLU expert: w1, w3 stacked as [2I, D], w2 as [D, I] (rows = output channels)."""
    return matrix_bytes(2 * inter, hidden, precision, full_itemsize) + \
        matrix_bytes(hidden, inter, precision, full_itemsize)


def plan_bytes(plan: ExpertPlan, bytes_of: dict[str, int]) -> int:
    return sum(bytes_of[c.precision] for c in plan.copies)


def rnq_plan(load, importance, bytes_of: dict[str, int], replica: str = "int8",
             quant: str = "int4", replicas: int | None = None) -> ExpertPlan:
    """Greedy (as EPLB): add a `replica`-precision copy to the expert of largest load/copies, then
    store the least important unreplicated experts in `quant` until the layer fits its original
    bytes; stop when it no longer fits, after `replicas` extra copies, or (replicas=None) when no
    copy carries more than the mean expert load. Copies 0..E-1 are the originals, in order."""
    load = [float(x) for x in load]
    E = len(load)
    budget = E * bytes_of["full"]
    least_important = sorted(range(E), key=lambda e: float(importance[e]))
    copies, quantised = [1] * E, set()

    def fit(copies):
        quantised, used = set(), sum(bytes_of["full"] + (n - 1) * bytes_of[replica] for n in copies)
        for e in least_important:
            if used <= budget:
                break
            if copies[e] == 1:
                quantised.add(e)
                used += bytes_of[quant] - bytes_of["full"]
        return quantised if used <= budget else None

    mean = sum(load) / E
    while replicas is None or sum(copies) - E < replicas:
        e = max(range(E), key=lambda i: load[i] / copies[i])
        if replicas is None and load[e] / copies[e] <= mean:
            break
        trial = copies[:e] + [copies[e] + 1] + copies[e + 1:]
        q = fit(trial)
        if q is None:
            break
        copies, quantised = trial, q
    originals = [Copy(e, quant if e in quantised else "full") for e in range(E)]
    extra = [Copy(e, replica) for e in range(E) for _ in range(copies[e] - 1)]
    return ExpertPlan(originals + extra)


@register("rnq")
class ReplicateQuantize(Router):
    """Options: base (the router whose choice is kept: a name, default options, or a Router, as
    `make_router(name, plan="rnq", **opts)` builds it), replicas (extra copies per layer; default
    until no copy is heavier than the mean expert), replica and quant precisions."""
    is_plan = True
    OPTIONS = {"base": Option("router", "topk"), "replicas": Option("integer", None, lo=0),
               "replica": Option("choice", "int8", choices=PRECISIONS[1:]),
               "quant": Option("choice", "int4", choices=PRECISIONS[1:])}

    def setup(self):
        from . import make_router
        if isinstance(self.base, str):
            self.base = make_router(self.base)

    def check_layer(self, ctx):
        super().check_layer(ctx)
        self.base.check_layer(ctx)

    def attach(self, block, calib):
        if calib is None or "load" not in calib or "importance" not in calib:
            raise ValueError("rnq needs a calibration file with expert loads and importance "
                             "(run `tinymoe calibrate MODEL --data FILE --out calib.safetensors`, "
                             "then pass --calib calib.safetensors)")
        self.base.attach(block, calib)
        ex = block.experts
        E, inter, hidden = ex.w_gate.shape
        itemsize = ex.w_gate.element_size()
        bytes_of = {p: expert_bytes(hidden, inter, p, itemsize) for p in PRECISIONS}
        plan = rnq_plan(calib["load"], calib["importance"], bytes_of, self.replica, self.quant,
                        self.replicas)
        ex.apply_plan(plan)
        used = ex.weight_bytes() if hasattr(ex, "weight_bytes") else plan_bytes(plan, bytes_of)
        if used > E * bytes_of["full"]:  # the experts' own count disagrees with the mirror above
            raise RuntimeError(f"rnq plan takes {used} bytes, over the layer's {E * bytes_of['full']}")
        block.ctx.state.update(plan=plan, plan_bytes=used, budget_bytes=E * bytes_of["full"],
                               copy_weight=copy_weights(plan, calib["load"]))

    def route(self, logits, hidden, ctx):
        return self.base.route(logits, hidden, ctx)


def copy_weights(plan: ExpertPlan, load) -> torch.Tensor:
    """Expected tokens per physical copy from calibration loads (for placing copies on devices)."""
    n = torch.zeros(len(plan.copies))
    counts = torch.bincount(torch.tensor([c.expert for c in plan.copies]))
    for i, c in enumerate(plan.copies):
        n[i] = float(load[c.expert]) / int(counts[c.expert])
    return n
