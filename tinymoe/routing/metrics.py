"""Balance metrics (docs/routing.md, sections 8-9) and the load recorder that feeds them.

All metrics count routed experts only. Per-pass figures are computed on each forward pass and
then averaged; pooled figures on the loads summed over the run (pooled is smaller)."""
import time
from collections import defaultdict

import torch

from ..experts.dispatch import copy_loads, copy_table
from ..experts.placement import contiguous, pack
from ..experts.plan import ExpertPlan


def imbalance(load: torch.Tensor) -> float:
    """I = max / mean (1 is perfect). Also the LIS of R&Q when `load` is over physical copies."""
    load = load.double()
    mean = load.mean()
    return float(load.max() / mean) if mean > 0 else 1.0


def gini(load: torch.Tensor) -> float:
    """sum_i (2i - E - 1) x_(i) / (E sum x), loads sorted ascending (i from 1)."""
    x = load.double().sort().values
    E, total = x.numel(), x.sum()
    if total == 0:
        return 0.0
    i = torch.arange(1, E + 1, dtype=torch.float64)
    return float(((2 * i - E - 1) * x).sum() / (E * total))


def minmax(load: torch.Tensor) -> float:
    top = load.max()
    return float(load.min() / top) if top > 0 else 1.0


def cv(load: torch.Tensor) -> float:
    load = load.double()
    mean = load.mean()
    return float(load.std(unbiased=False) / mean) if mean > 0 else 0.0


def physical_loads(load: torch.Tensor, plan: ExpertPlan | None, table=None) -> torch.Tensor:
    """Loads per physical copy, as the experts' own dispatch (`experts.dispatch`) assigns them;
    `table` is `copy_table(plan, E)` when the caller already has it."""
    if plan is None:
        return load.clone()
    table, counts = table if table is not None else copy_table(plan, load.numel())
    return copy_loads(load, table, counts, len(plan.copies))


def placement(plan: ExpertPlan | None, num_experts: int, devices: int,
              copy_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Each copy's device, as expert parallelism would place it (`experts.placement`):
    contiguous; with replicas, packed by the expected per-copy load."""
    P = num_experts if plan is None else len(plan.copies)
    if P > num_experts and copy_weight is not None:
        rank_of = pack(copy_weight.double().tolist(), [c.expert for c in plan.copies], devices)
    else:
        rank_of = contiguous(P, devices)
    return torch.tensor(rank_of, dtype=torch.int64)


def placed(experts, state: dict, num_experts: int, devices: int):
    """A layer's (plan or None, each copy's device [P], number of devices) for I_dev: under expert
    parallelism (`experts.shard` set) the copies as placed on the ranks; else the router's plan
    (`state["plan"]`) placed on `devices` as `placement` models it."""
    if experts is not None and experts.shard is not None:
        plan = experts.plan
        return plan, torch.tensor([c.device for c in plan.copies], dtype=torch.int64), experts.shard.group.world
    plan = state.get("plan")
    return plan, placement(plan, num_experts, devices, state.get("copy_weight")), devices


def device_loads(copy_load: torch.Tensor, device_of: torch.Tensor, devices: int) -> torch.Tensor:
    return torch.zeros(devices, dtype=torch.float64).index_add_(0, device_of, copy_load.double())


def ep_step_time(copy_load: torch.Tensor, device_of: torch.Tensor, devices: int,
                 alpha: float, beta: float) -> float:
    """Modelled expert-parallel layer time: max_g (alpha tokens_g + beta active_g); T_comm is
    taken equal across routers and left out."""
    tokens = device_loads(copy_load, device_of, devices)
    active = device_loads((copy_load > 0).double(), device_of, devices)
    return float((alpha * tokens + beta * active).max())


@torch.no_grad()
def measure_alpha_beta(experts, hidden_size: int, repeats: int = 7,
                       dtype=torch.float32) -> tuple[float, float]:
    """Fit time = c + alpha * assignments + beta * active experts on this machine, by timing the
    layer's own expert computation on crafted assignments (best of `repeats`). Seconds."""
    E = experts.num_experts
    rows, times = [], []
    for n in (16, 128, 1024):
        for m in sorted({1, max(1, E // 2), E}):
            if m > n:
                continue
            x = torch.randn(n, hidden_size, dtype=dtype)
            ids = (torch.arange(n) % m).view(n, 1)
            w = torch.ones(n, 1, dtype=dtype)
            experts(x, ids, w)  # warm-up: first calls pay for allocation and kernel selection
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                experts(x, ids, w)
                best = min(best, time.perf_counter() - t)
            rows.append([1.0, n, m])
            times.append(best)
    sol = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                             torch.tensor(times, dtype=torch.float64)[:, None]).solution.flatten()
    return max(float(sol[1]), 1e-12), max(float(sol[2]), 0.0)


class LoadRecorder:
    """Attach to a model's MoE blocks (`block.recorder`) to record expert loads per layer and per
    forward pass. `phase` tags the passes ("prefill", "decode", ...). Detached, it costs nothing."""

    def __init__(self):
        self.phase = "run"
        self.passes = defaultdict(lambda: defaultdict(list))  # phase -> layer -> [load [E]]
        self.num_experts, self.ctxs, self.experts = {}, {}, {}

    def attach(self, model):
        for block in model.moe_blocks():
            block.recorder = self
            self.num_experts[block.ctx.layer] = block.ctx.rule.num_experts
            self.ctxs[block.ctx.layer] = block.ctx
            self.experts[block.ctx.layer] = block.experts
        return self

    def detach(self, model):
        for block in model.moe_blocks():
            block.recorder = None

    def record(self, layer: int, ids: torch.Tensor):
        load = torch.bincount(ids.reshape(-1), minlength=self.num_experts[layer])
        self.passes[self.phase][layer].append(load.cpu())

    def reset(self):
        self.passes.clear()

    def pooled(self, phase: str) -> dict[int, torch.Tensor]:
        return {layer: torch.stack(p).sum(0) for layer, p in self.passes[phase].items()}

    def summary(self, phase: str, devices: int = 1, alpha: float = 1.0, beta: float = 0.0) -> dict:
        """Per-pass metrics averaged over passes and layers, pooled I_agg, the flat-branch fraction
        and the modelled EP time (sum over passes and layers)."""
        per_pass = defaultdict(list)
        ep_time = 0.0
        for layer, loads in self.passes[phase].items():
            plan, device_of, devices = placed(self.experts.get(layer), self.ctxs[layer].state,
                                              self.num_experts[layer], devices)
            table = copy_table(plan, self.num_experts[layer]) if plan is not None else None
            for load in loads:
                phys = physical_loads(load, plan, table)
                per_pass["i"].append(imbalance(phys))
                per_pass["i_dev"].append(imbalance(device_loads(phys, device_of, devices)))
                per_pass["gini"].append(gini(phys))
                per_pass["minmax"].append(minmax(phys))
                per_pass["cv"].append(cv(phys))
                ep_time += ep_step_time(phys, device_of, devices, alpha, beta)
        pooled = [imbalance(physical_loads(load, placed(self.experts.get(layer), self.ctxs[layer].state,
                                                        self.num_experts[layer], devices)[0]))
                  for layer, load in self.pooled(phase).items()]
        out = {key: sum(v) / len(v) for key, v in per_pass.items() if v}
        out["i_agg"] = out.pop("i", float("nan"))
        out["i_agg_pooled"] = sum(pooled) / len(pooled) if pooled else float("nan")
        out["passes"] = max((len(v) for v in self.passes[phase].values()), default=0)
        out["ep_time"] = ep_time
        return out


def flat_fraction(model) -> float | None:
    """Share of routed tokens that took LASER's flat branch, over all MoE layers (None if no
    router counted)."""
    flat = tokens = 0
    for block in model.moe_blocks():
        flat += block.ctx.state.get("flat", 0)
        tokens += block.ctx.state.get("tokens", 0)
    return flat / tokens if tokens else None
