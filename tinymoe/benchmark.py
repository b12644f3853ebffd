"""`tinymoe bench`: every router measured for speed, balance and accuracy in one table.

Per router and batch B: B windows of the text are decoded together, teacher forced: the first
prompt_len tokens of each in one prefill pass, then one pass of B tokens per position for
gen_len positions. Balance is per forward pass, averaged over the decode passes (prefill passes
are summarised apart); perplexity and top-1 agreement (against top-k on the same tokens) score
the decoded positions, so accuracy is measured in the same routing regime as balance. Prefill
and decode t/s come from the engine's LLM when there is one, else from this driver."""
import csv
import io
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .evaluation import perplexity
from .progress import bar
from .routing import install, label, make_router
from .routing.metrics import LoadRecorder, measure_alpha_beta

KEYS = ["router", "batch", "pp_tps", "tg_tps", "i_agg", "i_dev", "gini", "minmax", "flat_frac",
        "ppl", "ppl_delta_pct", "agree_top1", "ep_speedup"]
EP_KEYS = ["ep_step_ms", "busy_mean_ms", "busy_max_ms", "busy_max_model_ms", "straggler"]  # with --ep


@dataclass
class Row:
    router: str
    batch: int
    pp_tps: float
    tg_tps: float
    i_agg: float
    i_dev: float
    gini: float
    minmax: float
    flat_frac: float | None
    ppl: float
    ppl_delta_pct: float
    agree_top1: float
    ep_speedup: float
    # measured across the ranks with --ep, per decode pass (the median over passes): the MoE
    # layers' time (experts and combine, slowest rank), the ranks' mean and max expert busy time,
    # the max the model of docs/routing.md section 9 predicts from the loads (a mean), and the
    # median over layer calls of max / mean busy (medians: a rank the OS preempts for a moment
    # would inflate a mean)
    ep_step_ms: float | None = None
    busy_mean_ms: float | None = None
    busy_max_ms: float | None = None
    busy_max_model_ms: float | None = None
    straggler: float | None = None
    round: int = 0  # which of run()'s `rounds` measured it


class StaticCache:
    """Dense KV cache for B sequences of equal length growing in step (the bench's shape); the
    model's only call is `attend` (docs/DESIGN.md)."""

    def __init__(self, batch: int):
        self.batch, self.pos, self.k, self.v = batch, 0, {}, {}

    def attend(self, layer, q, k, v):
        B = self.batch
        n = q.shape[0] // B
        q, k, v = (t.view(B, n, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        if layer in self.k:
            k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        self.k[layer], self.v[layer] = k, v
        mask = None
        if n > 1:  # new tokens see the past and themselves causally
            total = k.shape[2]
            mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return o.transpose(1, 2).reshape(B * n, o.shape[1], o.shape[3])


@torch.no_grad()
def decode_teacher_forced(model, rows: torch.Tensor, prompt_len: int, recorder: LoadRecorder, tick=None):
    """B sequences decoding together, fed the text's own next tokens: prefill rows[:, :P] in one
    pass, then one pass of B tokens per position. Scores every token after the prompt.
    Returns (nll [B*G], argmax [B*G], prefill seconds, decode seconds, decode flat fraction)."""
    device = next(model.parameters()).device
    rows = rows.to(device)
    B, total = rows.shape
    P = prompt_len
    cache = StaticCache(B)
    recorder.phase = "prefill"
    ranks = getattr(model, "expert_ranks", None)
    if ranks is not None:  # expert-parallel timings of the decode passes only
        timings, ranks.group.timings = ranks.group.timings, None
    t0 = time.perf_counter()
    hidden = model.hidden_states(rows[:, :P], torch.arange(P, device=device), cache)
    logits = [model.logits(hidden[:, -1]).float()]
    cache.pos = P
    t_prefill = time.perf_counter() - t0
    if tick:
        tick(1)
    before = _flat_counts(model)
    recorder.phase = "decode"
    if ranks is not None:
        ranks.group.timings = timings
    t0 = time.perf_counter()
    for t in range(P, total - 1):
        hidden = model.hidden_states(rows[:, t:t + 1], torch.tensor([t], device=device), cache)
        logits.append(model.logits(hidden[:, -1]).float())
        cache.pos += 1
        if tick:
            tick(1)
    t_decode = time.perf_counter() - t0
    after = _flat_counts(model)
    logp = torch.log_softmax(torch.stack(logits, 1), -1)  # [B, G, V] predicting rows[:, P:]
    nll = -logp.gather(-1, rows[:, P:, None]).squeeze(-1)
    tokens = after[1] - before[1]
    flat = (after[0] - before[0]) / tokens if tokens else None
    return nll.reshape(-1).cpu(), logp.argmax(-1).reshape(-1).cpu(), t_prefill, t_decode, flat


def _flat_counts(model):
    flat = sum(b.ctx.state.get("flat", 0) for b in model.moe_blocks())
    return flat, sum(b.ctx.state.get("tokens", 0) for b in model.moe_blocks())


def engine_throughput(model, name, calib, opts, prompts: torch.Tensor, gen_len: int, plan=None):
    """Prefill and decode t/s of the engine's LLM on this model (None if there is no engine)."""
    try:
        from .engine import LLM, SamplingParams
    except ImportError:
        return None
    B, P = prompts.shape
    llm = LLM(model, router=name, calib=calib, max_num_seqs=B, max_batch_tokens=max(B * P, 512),
              kv_cache_tokens=B * (P + gen_len + 16), prefix_caching=False, plan=plan, router_opts=opts)
    outs = llm.generate(prompts.tolist(), SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True))
    first = max(o.time_to_first_token for o in outs)
    last = max(o.latency for o in outs)
    return B * P / first, (B * (gen_len - 1) / (last - first) if gen_len > 1 and last > first else math.nan)


def run(model, routers: list[str], batches: list[int], tokens: torch.Tensor, prompt_len: int = 64,
        gen_len: int = 32, devices: int = 4, calib=None, router_opts: dict | None = None,
        min_sequences: int = 16, engine: bool = True, progress: bool = False, plan=None,
        ranks=None, placement: str = "contiguous", rounds: int = 1, reference: bool = False) -> dict:
    """The whole bench; top-k always runs as the reference. Every router in `routers` runs under
    `plan` if given (rows say "laser+rnq"). With `progress`, a bar on stderr counts the model's
    forward passes. Returns {"rows": [Row], "prefill": [dict], "heat": {router: [layers, E]},
    "alpha", "beta" (seconds), "devices"}.

    `ranks` (an engine.parallel.Ranks; every rank runs this same call, see `run_ranked`) spreads
    the experts over the ranks by `placement`: I_dev and the modelled speedup are then over the
    ranks as placed, and each row gains the measured EP_KEYS. `rounds` > 1 measures the routers
    that many times over in turn, a row per router and round (`Row.round`): timings a round
    apart share a noisy host's slow phases (bench/ep.py compares routers within a round).
    `reference` returns top-k's rows too when `routers` lacks it (the plain top-k every run
    measures first: the within-round reference of a row under a plan)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds takes a whole number of 1 or more, not {rounds!r}")
    opts = check_routers(routers, router_opts or {}, plan)
    blocks = list(model.moe_blocks())
    if not blocks:
        raise ValueError("the model has no MoE layers to route")
    install(model, "topk")
    alpha, beta = measure_alpha_beta(blocks[0].experts, model.config.hidden_size,
                                     dtype=blocks[0].experts.w_gate.dtype)
    if ranks is not None:  # after alpha and beta: the model's figures are for one device's experts
        from .engine.parallel import shard_model
        shard_model(model, ranks, placement, calib)
        devices = ranks.world
    need = max(batches) * (prompt_len + gen_len)
    source = tokens.repeat(math.ceil(need / tokens.numel())) if tokens.numel() < need else tokens
    wanted = [label(r, plan) for r in routers]
    names = ["topk"] + [r for r in routers if label(r, plan) != "topk"]
    windows = {B: max(1, math.ceil(min_sequences / B)) for B in batches}  # batches of windows a router
    seqs_of = {B: _windows(source, B * windows[B], prompt_len + gen_len) for B in batches}  # the same each round

    out, prefill, heat, notes = [], [], {}, {}
    passes = rounds * sum(len(names) * windows[B] * gen_len for B in batches)  # 1 prefill, gen_len - 1 decodes
    with bar(total=passes, desc="bench", unit="pass", disable=not progress) as counter:
        for B, turn, (i, name) in itertools.product(batches, range(rounds), enumerate(names)):
            seqs = seqs_of[B]
            with_plan = plan if i else None  # the first is the plain top-k reference
            tag = label(name, with_plan)
            install(model, name, calib, plan=with_plan, **opts.get(name, {}))
            if "plan" in blocks[0].ctx.state:
                notes[tag] = _plan_note(tag, blocks)
            rec = LoadRecorder().attach(model)
            parts = []
            if ranks is not None:
                ranks.group.timings = []
            try:
                for r in range(windows[B]):  # small batches: several, so enough tokens are scored
                    rows = seqs[r * B:(r + 1) * B]
                    parts.append(decode_teacher_forced(model, rows, prompt_len, rec, counter.update))
            finally:
                rec.detach(model)
            nll, top = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            t_pre, t_dec = sum(p[2] for p in parts), sum(p[3] for p in parts)
            flats = [p[4] for p in parts if p[4] is not None]
            flat = sum(flats) / len(flats) if flats else None
            dec = rec.summary("decode", devices, alpha, beta)
            measured = {}
            if ranks is not None:
                measured = ep_measured(ranks, len(blocks))
                measured["busy_max_model_ms"] = 1e3 * dec["ep_time"] / max(dec["passes"], 1)
            if i == 0:
                ref_ppl, ref_top, ref_time = perplexity(nll), top, dec["ep_time"]
            if tag not in wanted and not (reference and i == 0):
                continue
            speed = engine_throughput(model, name, calib, opts.get(name, {}), seqs[:B, :prompt_len],
                                      gen_len, with_plan) if engine else None
            if speed is None:  # no engine: the bench driver's own timings
                n = windows[B] * B
                speed = n * prompt_len / t_pre, n * (gen_len - 1) / t_dec if gen_len > 1 else math.nan
            ppl = perplexity(nll)
            out.append(Row(tag, B, *speed,
                           dec.get("i_agg", math.nan), dec.get("i_dev", math.nan), dec.get("gini", math.nan),
                           dec.get("minmax", math.nan), flat, ppl, 100 * (ppl / ref_ppl - 1),
                           float((top == ref_top).float().mean()),
                           ref_time / dec["ep_time"] if dec["ep_time"] else math.nan, **measured, round=turn))
            if turn:
                continue
            prefill.append({"router": tag, "batch": B, "tokens": B * prompt_len,
                            **rec.summary("prefill", devices, alpha, beta)})
            if B == max(batches):
                heat[tag] = _heat(rec, model)
    install(model, "topk")
    return {"rows": out, "prefill": prefill, "heat": heat, "alpha": alpha, "beta": beta, "devices": devices,
            "notes": list(notes.values()), "layers": [b.ctx.layer for b in blocks]}


def ep_measured(ranks, layers: int) -> dict:
    """EP_KEYS from every rank's (busy s, layer s, assignments) per MoE layer call (decode passes)."""
    every = ranks.gather(ranks.group.timings)
    ranks.group.timings = None
    t = torch.tensor(every, dtype=torch.float64)  # [ranks, calls, 3]
    if t.numel() == 0:
        return {}
    busy, layer = t[..., 0], t[..., 1]
    # ms a pass, the median over passes: one pass the OS preempts (a 2-core VM does, often) would
    # move a mean by more than the routers differ
    per_pass = lambda x: x.view(-1, layers).sum(1).median().item() * 1e3  # noqa: E731
    mean = busy.mean(0)
    return {"ep_step_ms": per_pass(layer.max(0).values), "busy_mean_ms": per_pass(mean),
            "busy_max_ms": per_pass(busy.max(0).values),
            "straggler": (busy.max(0).values / mean.clamp(min=1e-12)).median().item()}


def run_ranked(ranks, model: str, dtype=None, quant=None, combine: str | None = None, **kwargs) -> dict | None:
    """`run` on every rank of an expert-parallel launch (`engine.parallel.run_spmd`): each rank
    loads `model` and runs the same bench, with one progress bar (rank 0's); rank 0 gets the
    result. `combine` forces the experts' combine (experts/parallel.py; bench/ep.py compares them)."""
    from . import load_model
    net = load_model(model, dtype=dtype, quant=quant)
    kwargs["progress"] = kwargs.get("progress", False) and ranks.rank == 0
    if combine is not None:
        ranks.group.combine = combine
    return run(net, ranks=ranks, **kwargs)


def _plan_note(name: str, blocks) -> str:
    states = [b.ctx.state for b in blocks]
    copies = sum(len(st["plan"].copies) for st in states) / len(states)
    quant = sum(sum(c.precision != "full" for c in st["plan"].copies) for st in states) / len(states)
    used = sum(st["plan_bytes"] for st in states) / sum(st["budget_bytes"] for st in states)
    return (f"{name}: {copies:.1f} physical copies a layer ({quant:.1f} quantised) in {100 * used:.1f}% "
            f"of the original expert bytes; I and I_dev count physical copies")


def _opts_for(router: str, opts: dict) -> dict:
    """Each --router-opt goes to the routers that have that option."""
    from .routing import ROUTERS, options
    if router not in ROUTERS:
        return {}
    return {k: v for k, v in opts.items() if k in options(ROUTERS[router])}


def check_routers(routers: list[str], opts: dict, plan=None) -> dict[str, dict]:
    """Fail fast on a bad router or plan name or an option no listed router has; -> options per
    router."""
    per = {r: _opts_for(r, opts) for r in routers}
    for r in routers:
        make_router(r, plan=plan, **per[r])
    for key in opts:
        if not any(key in o for o in per.values()):
            raise ValueError(f"no router among {', '.join(routers)} has the option {key!r}")
    return per


def _windows(tokens: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """`count` windows of `length` tokens from evenly spaced places in the text."""
    starts = torch.linspace(0, tokens.numel() - length, count).long()
    return torch.stack([tokens[s:s + length] for s in starts.tolist()])


def _heat(rec: LoadRecorder, model) -> torch.Tensor:
    """Pooled decode load per layer and expert, divided by the layer's mean."""
    pooled = rec.pooled("decode")
    rows = [pooled[b.ctx.layer].double() for b in model.moe_blocks() if b.ctx.layer in pooled]
    load = torch.stack(rows)
    return load / load.mean(1, keepdim=True).clamp(min=1e-9)


def format_rows(result: dict, fmt: str) -> str:
    rows = [asdict(r) for r in result["rows"]]
    keys = KEYS + (EP_KEYS if rows and rows[0]["ep_step_ms"] is not None else [])
    if fmt == "json":
        return json.dumps([{k: _clean(r[k]) for k in keys} for r in rows], indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    if fmt != "md":
        raise ValueError(f"unknown format {fmt!r}; valid: md, json, csv")
    G = result["devices"]
    head = ["router", "batch", "prefill t/s", "decode t/s", "I_agg", f"I_dev({G})", "Gini", "min/max",
            "flat %", "ppl", "ppl Δ %", "top-1 agree", "EP speedup (modelled)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        flat = "-" if r["flat_frac"] is None else f"{100 * r['flat_frac']:.1f}"
        lines.append(f"| {r['router']} | {r['batch']} | {r['pp_tps']:.1f} | {r['tg_tps']:.1f} | "
                     f"{r['i_agg']:.3f} | {r['i_dev']:.3f} | {r['gini']:.3f} | {r['minmax']:.3f} | {flat} | "
                     f"{r['ppl']:.3f} | {r['ppl_delta_pct']:+.2f} | {r['agree_top1']:.3f} | "
                     f"{r['ep_speedup']:.2f}x |")
    lines += ["", "Balance columns: per decode forward pass (B tokens), averaged over passes and MoE "
              "layers. Prefill passes (one pass of B x prompt tokens):", "",
              "| router | batch | tokens | I_agg | I_agg pooled | I_dev | Gini | min/max |", "|" + "---|" * 8]
    for p in result["prefill"]:
        lines.append(f"| {p['router']} | {p['batch']} | {p['tokens']} | {p['i_agg']:.3f} | "
                     f"{p['i_agg_pooled']:.3f} | {p['i_dev']:.3f} | {p['gini']:.3f} | {p['minmax']:.3f} |")
    if "ep_step_ms" in keys:
        lines += ["", f"Measured over {G} expert-parallel ranks (decode passes; ms a pass, summed over MoE layers):",
                  "", "| router | batch | ep_step_ms | busy mean ms | busy max ms | busy max ms (modelled) | "
                  "straggler (max/mean busy) | I_dev (modelled) |", "|" + "---|" * 8]
        for r in rows:
            lines.append(f"| {r['router']} | {r['batch']} | {r['ep_step_ms']:.2f} | {r['busy_mean_ms']:.2f} | "
                         f"{r['busy_max_ms']:.2f} | {r['busy_max_model_ms']:.2f} | {r['straggler']:.3f} | "
                         f"{r['i_dev']:.3f} |")
    lines += [""] + result.get("notes", [])
    lines.append(f"\nEP speedup is modelled (docs/routing.md, section 9) with alpha = "
                 f"{result['alpha'] * 1e6:.2f} us/token, beta = {result['beta'] * 1e6:.2f} us/expert "
                 f"measured here, on {G} devices.")
    return "\n".join(lines)


def _clean(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def plot_heatmaps(result: dict, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    heat = result["heat"]
    n = len(heat)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 3.2), squeeze=False)
    vmax = max(float(h.max()) for h in heat.values())
    layers = result.get("layers") or list(range(next(iter(heat.values())).shape[0]))
    for i, (ax, (name, h)) in enumerate(zip(axes[0], heat.items())):
        im = ax.imshow(h.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(name)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        if i == 0:
            ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="load / layer mean (decode, pooled)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
