"""One pass over calibration text that records, per MoE layer, what the routers need: top-k-mass
quantiles (LASER thresholds), expert loads and Wanda-style importance (R&Q), and a post-hoc fit
of latent prototypes (docs/routing.md, sections 3-5); then, for each router asked for, one more
pass routed by it that records its loads (what R&Q over that router sizes its replicas from).
Saved as one safetensors file."""
import json
import math

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .topk import TopK
from .prototype import prototype_scores

MASS_LEVELS = 101  # quantiles of the top-k mass at 0, 0.01, ..., 1


def load_key(router: str) -> str:
    """The per-layer key of the expert loads measured under `router`: "load" for top-k (every
    calibration has it), "load.NAME" for the routers `calibrate(..., routers=...)` ran."""
    return "load" if router == "topk" else f"load.{router}"


class Calibration:
    """Per-layer tensors keyed by the block's layer index (`ctx.layer`), plus metadata; `meta["model"]`
    records the model it was made from (`model_signature`), which `check` compares."""

    def __init__(self, layers: dict[int, dict[str, torch.Tensor]], meta: dict | None = None, source: str | None = None):
        self.layers, self.meta = layers, meta or {}
        self.source = source or "calibration"

    def layer(self, idx: int) -> dict | None:
        return self.layers.get(idx)

    def save(self, path):
        flat = {f"layers.{i}.{k}": v.contiguous() for i, d in self.layers.items() for k, v in d.items()}
        save_file(flat, str(path), metadata={"tinymoe": json.dumps(self.meta)})

    def _made(self) -> dict:
        made = self.meta.get("model")
        if not isinstance(made, dict):
            raise ValueError(f"{self.source} does not record which model it was made from (an older tinymoe "
                             f"wrote it); rerun `tinymoe calibrate`")
        return made

    def check_config(self, cfg) -> None:
        """What `check` can tell from a ModelConfig alone, before any weight is loaded."""
        made = self._made()
        for key, value in config_signature(cfg).items():
            if made.get(key) != value:
                raise ValueError(f"{self.source} was made for another model: {key} is {made.get(key)} there, "
                                 f"{value} here")

    def check(self, model) -> None:
        """Refuse, in one line naming the field, a calibration made from another model."""
        self.check_config(model.config)
        made, here = self._made(), model_signature(model)
        for layer, theirs, ours in zip(here["moe_layers"], made.get("gate_fingerprint", []), here["gate_fingerprint"]):
            a, b = torch.tensor(theirs, dtype=torch.float64), torch.tensor(ours, dtype=torch.float64)
            if a.shape != b.shape or (a - b).norm() > FINGERPRINT_RTOL * b.norm():
                raise ValueError(f"{self.source} was made for another model: the gate weights of layer {layer} "
                                 f"differ (gate_fingerprint)")


# The fingerprint of a gate: a few fixed projections of its weights. Unlike a hash of the bytes it
# survives a change of dtype (a calibration made in float32 serves the same model loaded in bf16,
# whose rounding moved it by 0.2% on a test checkpoint), while another model's gate moves it by ~100%.
FINGERPRINT_PROJECTIONS = 4
FINGERPRINT_RTOL = 0.02


def _gate_fingerprint(gate) -> list[float]:
    w = torch.cat([p.detach().reshape(-1).double().cpu() for _, p in sorted(gate.named_parameters())])
    i = torch.arange(w.numel(), dtype=torch.float64)
    # deterministic, not random: nothing here may depend on torch's generator across versions
    return [float(w @ torch.cos(0.6180339887 * (j + 1) * i + j)) for j in range(FINGERPRINT_PROJECTIONS)]


def config_signature(cfg) -> dict:
    """What a calibration records about the model's config."""
    return {"architecture": cfg.family, "num_layers": cfg.num_layers, "num_experts": cfg.num_experts,
            "top_k": cfg.top_k, "hidden_size": cfg.hidden_size,
            "moe_layers": [i for i, moe in enumerate(cfg.moe_layers) if moe]}


def model_signature(model) -> dict:
    """What a calibration records about the model it was made from: its config and gates."""
    return {**config_signature(model.config),
            "gate_fingerprint": [_gate_fingerprint(b.gate) for b in model.moe_blocks()]}


def load_calibration(path) -> Calibration:
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get("tinymoe")
        flat = load_file(str(path)) if meta is not None else {}
    except Exception as e:  # a missing or foreign file: one clear line
        raise ValueError(f"cannot read calibration file {path}: {_first_line(e)}") from None
    try:
        meta = json.loads(meta) if meta is not None else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):  # e.g. a model's weights passed as --calib
        raise ValueError(f"{path} is not a tinymoe calibration file (no calibration metadata)")
    layers: dict[int, dict] = {}
    for key, value in flat.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit():
            raise ValueError(f"{path} is not a tinymoe calibration file (unexpected tensor {key!r})")
        layers.setdefault(int(parts[1]), {})[parts[2]] = value
    return Calibration(layers, meta, str(path))


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class _Collect:
    """A `MoEBlock.observer`: this layer's calibration statistics from the model's own forward
    (its router's choice, the inputs its experts really get and their SwiGLU activations)."""

    def __init__(self, block, keep_rate: float):
        self.block, self.keep_rate = block, keep_rate
        E = block.ctx.rule.num_experts
        ex = block.experts
        self.mass, self.kept = [], []
        self.load = torch.zeros(E, dtype=torch.float64)
        self.sq_in = torch.zeros(E, ex.hidden, dtype=torch.float64)
        self.sq_mid = torch.zeros(E, ex.inter, dtype=torch.float64)

    def routed(self, block, hidden, logits, ids):
        rule = block.ctx.rule
        self.mass.append(rule.probs(logits).gather(-1, ids).sum(-1).cpu())
        self.load += torch.bincount(ids.reshape(-1), minlength=rule.num_experts).double().cpu()
        keep = torch.rand(hidden.shape[0]) < self.keep_rate
        self.kept.append(hidden[keep.to(hidden.device)].float().cpu())

    def expert(self, block, e, x, h):
        self.sq_in[e] += (x * x).sum(0).double().cpu()
        self.sq_mid[e] += (h * h).sum(0).double().cpu()

    def importance(self) -> torch.Tensor:
        """sum over w1, w3, w2 of sum_ij |W_ij| * ||X_j||_2 (X: inputs routed to the expert)."""
        ex = self.block.experts
        x_norm, h_norm = self.sq_in.sqrt().float(), self.sq_mid.sqrt().float()
        if ex.base_precision == "full":
            w_in = ex.w_gate.detach().float().abs().sum(1) + ex.w_up.detach().float().abs().sum(1)  # [E, D]
            w_mid = ex.w_down.detach().float().abs().sum(1)  # [E, I]
        else:  # quantised experts (--quant): the weights they compute with, one expert at a time
            ws = [ex.expert_weights(e) for e in range(ex.num_experts)]
            w_in = torch.stack([g.abs().sum(0) + u.abs().sum(0) for g, u, _ in ws])
            w_mid = torch.stack([d.abs().sum(0) for _, _, d in ws])
        return (w_in * x_norm).sum(-1) + (w_mid * h_norm).sum(-1)


@torch.no_grad()
def calibrate(model, tokens: torch.Tensor, seq_len: int = 256, batch: int = 8,
              fit_tokens: int = 4096, proto_steps: int = 200, latent_dim: int = 16,
              progress=None, seed: int = 0, routers=()) -> Calibration:
    """Run the model (top-k routing) over `tokens` [N] in windows of `seq_len`, `batch` at a time.
    `routers`: names, or (name, {option: value}), of routers (not plans) whose loads to record
    too: each then routes the same windows once more, attached to what this pass measured (so
    LASER's thresholds are the calibrated ones), and its per-layer loads are stored under
    `load_key(name)`; `meta["loads"]` keeps the options they ran with. `progress(windows)` is
    called for the windows of every pass."""
    from . import make_router
    specs = load_routers(routers)
    torch.manual_seed(seed)
    tokens = tokens.reshape(-1)
    windows = max(1, tokens.numel() // seq_len)
    if tokens.numel() < 2:
        raise ValueError("calibration text is empty after tokenisation")
    rows = tokens[: windows * seq_len].view(windows, -1) if tokens.numel() >= seq_len else tokens[None]
    blocks = list(model.moe_blocks())
    routed = {name: [make_router(name, **opts) for _ in blocks] for name, opts in specs.items()}
    for made in routed.values():
        for b, router in zip(blocks, made):
            router.check_layer(b.ctx)
    keep_rate = min(1.0, fit_tokens / rows.numel())
    saved = [(b.router, b.recorder, b.observer, dict(b.ctx.state)) for b in blocks]
    collectors = [_Collect(b, keep_rate) for b in blocks]
    try:
        for b, c in zip(blocks, collectors):
            b.router, b.recorder, b.observer = TopK(), None, c
        _forward(model, rows, batch, progress)
        for b in blocks:
            b.observer = None
        layers = {}
        for b, c in zip(blocks, collectors):
            mass = torch.cat(c.mass).float()
            d = {"mass_quantiles": torch.quantile(mass, torch.linspace(0, 1, MASS_LEVELS)),
                 "load": c.load.float(), "importance": c.importance()}
            if proto_steps > 0:
                d.update(fit_prototypes(b.gate, torch.cat(c.kept), latent_dim, proto_steps))
            layers[b.ctx.layer] = d
        for name, made in routed.items():
            counts = _Loads(blocks)
            for b, router in zip(blocks, made):
                b.ctx.state.clear()
                router.attach(b, layers[b.ctx.layer])
                b.router, b.recorder = router, counts
            _forward(model, rows, batch, progress)
            for b in blocks:
                layers[b.ctx.layer][load_key(name)] = counts.load[b.ctx.layer].float()
    finally:
        for b, (r, rec, obs, state) in zip(blocks, saved):
            b.router, b.recorder, b.observer = r, rec, obs
            b.ctx.state.clear()
            b.ctx.state.update(state)
    meta = {"tokens": int(rows.numel()), "seq_len": seq_len, "model": model_signature(model)}
    if routed:
        meta["loads"] = {name: made[0].opts for name, made in routed.items() if made}
    return Calibration(layers, meta)


def load_routers(routers) -> dict[str, dict]:
    """`calibrate`'s `routers` checked (registered routers, not plans; options valid) ->
    {name: options}, top-k left out (its loads are "load")."""
    from . import make_router
    specs = {}
    for spec in routers:
        name, opts = (spec, {}) if isinstance(spec, str) else (spec[0], dict(spec[1] or {}))
        if make_router(name, **opts).is_plan:
            raise ValueError(f"calibrate records loads under routers, not plans: {name!r} is a plan "
                             f"(R&Q's loads are its base router's)")
        if name != "topk":
            specs[name] = opts
    return specs


def _forward(model, rows, batch, progress):
    device = next(model.parameters()).device
    for s in range(0, rows.shape[0], batch):
        model(rows[s:s + batch].to(device))
        if progress:
            progress(min(batch, rows.shape[0] - s))


class _Loads:
    """A `MoEBlock.recorder` summing each layer's assignments over the pass."""

    def __init__(self, blocks):
        self.load = {b.ctx.layer: torch.zeros(b.ctx.rule.num_experts, dtype=torch.float64) for b in blocks}

    def record(self, layer, ids):
        self.load[layer] += torch.bincount(ids.reshape(-1).cpu(), minlength=self.load[layer].numel())


def fit_prototypes(gate, x: torch.Tensor, latent_dim: int = 16, steps: int = 200,
                   beta_div: float = 0.1, beta_bal: float = 1.0, lr: float = 1e-2,
                   minibatch: int = 256) -> dict[str, torch.Tensor]:
    """Fit LN, A, a, P (experts frozen) so that softmax(cos(mu, P) / tau) follows the gate, with
    prototypes and latents pushed apart and soft expert usage pulled towards uniform."""
    with torch.no_grad():
        target = torch.softmax(gate(x.to(next(gate.parameters()).dtype)).float(), -1)
    E, D = target.shape[1], x.shape[1]
    g = torch.Generator().manual_seed(0)
    params = {
        "norm.weight": torch.ones(D), "norm.bias": torch.zeros(D),
        "encoder.weight": torch.randn(latent_dim, D, generator=g) / math.sqrt(D),
        "encoder.bias": torch.zeros(latent_dim),
        "prototypes": torch.randn(E, latent_dim, generator=g),
        "log_tau": torch.tensor(math.log(0.1)),
    }
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    eye_e = torch.eye(E)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (min(minibatch, x.shape[0]),), generator=g)
            xb, pb = x[idx], target[idx]
            s = prototype_scores(xb, params["norm.weight"], params["norm.bias"],
                                 params["encoder.weight"], params["encoder.bias"], params["prototypes"])
            logq = torch.log_softmax(s / params["log_tau"].exp(), -1)
            kl = F.kl_div(logq, pb, reduction="batchmean")
            pn = F.normalize(params["prototypes"], dim=-1)
            mu = F.linear(F.silu(F.layer_norm(xb[:64], (D,), params["norm.weight"], params["norm.bias"])),
                          params["encoder.weight"], params["encoder.bias"])
            mn = F.normalize(mu, dim=-1)
            div = ((pn @ pn.T - eye_e) ** 2).sum() / E ** 2 + \
                ((mn @ mn.T - torch.eye(mn.shape[0])) ** 2).sum() / mn.shape[0] ** 2
            usage = logq.exp().mean(0)
            balance = E * (usage * usage).sum() - 1  # zero iff the batch's soft usage is uniform
            loss = kl + beta_div * div + beta_bal * balance
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = {f"proto.{k}": v.detach().clone() for k, v in params.items() if k != "log_tau"}
    out["proto.temperature"] = params["log_tau"].detach().exp().clone()
    return out
