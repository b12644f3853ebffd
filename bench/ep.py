"""Expert parallelism measured: per router, the straggler the ranks really see, beside the model.

    python bench/ep.py [--models tiny,tiny-deepseek] [--routers topk,laser,budget,rnq,laser+rnq,balanced]
                       [--ranks 2] [--batch 64] [--rounds 5] [--repeats 1] [--combine-batches 1,8,64,256]
                       [--placement contiguous] [--parts routers,combine,collectives]

Part 1, per model: `tinymoe bench --ep G` at one batch (teacher-forced decode passes of B
windows of the held-out text, one CPU thread per rank), every router in one launch so that the
rows share one run: measured MoE time a decode pass (`ep_step_ms`: experts + combine, slowest
rank), the ranks' mean and max expert busy time, the straggler ratio (median over layer calls
of max / mean busy) beside the modelled I_dev of the same passes, and the model's max busy time
(docs/routing.md section 9, alpha and beta fitted on one rank's experts). The calibration is
made once per model with the loads of laser and budget recorded, so `laser+rnq` sizes its
replicas for laser's loads. Each launch measures its routers `--rounds` times over in turn
(a router's passes take about a second), and "vs top-k" is the median (and range) over rounds
of top-k's ep_step_ms in the same round over the router's: on a shared 2-core VM timings
minutes apart move by ~15%, more than routers differ. A row with a plan or options runs in a
launch of its own with its own top-k. `--repeats N` launches it all N times. The plans' notes
give their expert bytes.
Part 2: the combines of experts/parallel.py at several batch sizes, top-k, same model: the
all-gather of the assignment rows through shared memory (the default on one host) and through
the process group (gloo; TINYMOE_EP_SHM=0), and the all-reduce of a zeroed [T, k, D].
Part 3: the collectives alone: median time of gloo's all_gather and all_reduce from 1 KiB to
4 MiB a rank, and of the shared-memory all-gather, each fitted as latency + bytes / bandwidth
(docs/scaling.md's alpha and beta).
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinymoe import load_model, load_tokenizer  # noqa: E402
from tinymoe.engine.parallel import run_spmd  # noqa: E402
from tinymoe.evaluation import read_tokens  # noqa: E402
from tinymoe.routing import ROUTERS, make_router  # noqa: E402
from tinymoe.routing.calibrate import calibrate  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tinymoe" / "assets" / "data" / "heldout.txt"


def parse_row(spec: str) -> tuple[str, dict, str | None]:
    """`name[:key=value...][+plan]` -> (router, its options typed by the router, plan)."""
    base, _, plan = spec.partition("+")
    name, *pairs = base.split(":")
    opts = make_router(name, **dict(p.split("=", 1) for p in pairs)).opts if pairs else {}
    return name, opts, plan or None


def bench(model, specs, ranks, batch, tokens, calib, placement, rounds=1, combine=None, gen_len=32):
    """Rows of `tinymoe bench --ep ranks` for the row specs, the routers measured `rounds` times
    over in turn in each launch: plain router names in one launch, each with options or a plan
    in a launch of its own (bench runs one plan a launch) beside that launch's own top-k, labelled
    by their spec. -> (a list of rows per launch, the plans' notes)."""
    notes = []

    def launch(names, plan=None, opts=None, label=None):
        out = run_spmd(ranks, "tinymoe.benchmark:run_ranked", dict(
            model=model, routers=names, batches=[batch], tokens=tokens, prompt_len=64, gen_len=gen_len,
            calib=calib, min_sequences=batch, engine=False, placement=placement, plan=plan,
            combine=combine, router_opts=opts, rounds=rounds, reference=True))
        notes.extend(f"{label}:{n.partition(':')[2]}" if label else n for n in out["notes"])
        return out["rows"]
    launches = [launch([s for s in specs if parse_row(s) == (s, {}, None)])]
    for spec in specs:
        name, opts, plan = parse_row(spec)
        if (opts, plan) != ({}, None):
            rows = launch([name], plan, opts, spec)
            for row in rows:
                row.router = row.router if row.router == "topk" and name != "topk" else spec
            launches.append(rows)
    return launches, notes


def calibration_routers(specs) -> list:
    """The routers whose loads the calibration records (for R&Q over them): laser and budget,
    with the options of the row that puts a plan over them."""
    planned = {name: opts for name, opts, plan in map(parse_row, specs) if plan}
    return [(r, planned.get(r, {})) for r in ("laser", "budget") if r in ROUTERS]


def medians(launches, specs):
    """One row per spec: each measured field's median over its launches and rounds, and
    `vs_topk`, the median (and range) over those of the same round's top-k ep_step_ms over the
    spec's (top-k of the spec's own launch): rounds seconds apart share the host's slow phases,
    launches minutes apart do not."""
    out = []
    for spec in specs:
        runs, ratios = [], []
        for rows in launches:
            reference = {r.round: r for r in rows if r.router == "topk"}
            for r in rows:
                if r.router == spec:
                    runs.append(r)
                    ratios.append(reference[r.round].ep_step_ms / r.ep_step_ms)
        fields = {k: statistics.median(getattr(r, k) for r in runs) for k in
                  ("i_agg", "i_dev", "straggler", "busy_max_ms", "busy_max_model_ms", "ep_step_ms")}
        out.append(dict(router=spec, ppl_delta_pct=runs[0].ppl_delta_pct, vs_topk=statistics.median(ratios),
                        vs_topk_range=(min(ratios), max(ratios)), samples=len(ratios), **fields))
    return out


def collectives(ranks, sizes, reps=20):
    """Each rank: median seconds of gloo's all_gather and all_reduce and of the shared-memory
    all-gather (experts/exchange.py; sizes that fit a slot) of `sizes` bytes (bf16), per size."""
    import torch
    import torch.distributed as dist
    out = {}
    shared = ranks.group.shared
    for n in sizes:
        x = torch.zeros(max(1, n // 2), dtype=torch.bfloat16)
        parts = [torch.empty_like(x) for _ in range(ranks.world)]
        ops = [("allgather", lambda: dist.all_gather(parts, x)), ("allreduce", lambda: dist.all_reduce(x))]
        if shared is not None and shared.fits(n):
            rows = x.view(1, -1)
            ops.append(("shared", lambda: shared.all_gather(rows, [1] * ranks.world)))
        for name, op in ops:
            op()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                op()
                times.append(time.perf_counter() - t)
            out[(name, n)] = statistics.median(times)
    return out


def fit(points):
    """t = latency + bytes / bandwidth: the latency is the smallest message's time, the bandwidth
    the largest message's bytes over its time beyond that (a least-squares line is ruled by the
    large messages and can put the latency below zero)."""
    (n0, t0), (n1, t1) = min(points), max(points)
    return t0, (n1 - n0) / max(t1 - t0, 1e-12)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,tiny-deepseek")
    ap.add_argument("--routers", default="topk,laser,budget,rnq,laser+rnq,balanced")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--combine-batches", default="1,8,64,256")
    ap.add_argument("--placement", default="contiguous")
    ap.add_argument("--parts", default="routers,combine,collectives")
    ap.add_argument("--rounds", type=int, default=5, help="part 1: the routers measured this many times over in turn, "
                                                           "each launch; the table gives medians")
    ap.add_argument("--repeats", type=int, default=1, help="launches of part 1")
    args = ap.parse_args()
    parts = args.parts.split(",")
    routers = [r for r in args.routers.split(",") if parse_row(r)[0] in ROUTERS or r == "rnq"]
    skipped = set(args.routers.split(",")) - set(routers)
    if skipped:
        print(f"(not registered here, skipped: {', '.join(sorted(skipped))})")
    for model in args.models.split(",") if "routers" in parts else []:
        tokens = read_tokens(load_tokenizer(model), DATA)
        calib = calibrate(load_model(model), tokens[:16384], seq_len=128, routers=calibration_routers(routers))
        launches, notes = [], []
        for _ in range(args.repeats):
            rows, notes = bench(model, routers, args.ranks, args.batch, tokens, calib, args.placement, args.rounds)
            launches.extend(rows)
        print(f"\n## {model}: {args.ranks} ranks, batch {args.batch}, placement {args.placement}, "
              f"medians over {args.repeats} launch(es) x {args.rounds} rounds\n")
        print("| router | I_agg | I_dev (modelled) | straggler (measured) | straggler / I_dev | busy max ms | "
              "busy max ms (modelled) | ep_step_ms | vs top-k (min-max) | ppl Δ % |")
        print("|" + "---|" * 10)
        for r in medians(launches, routers):
            lo, hi = r["vs_topk_range"]
            print(f"| {r['router']} | {r['i_agg']:.3f} | {r['i_dev']:.3f} | {r['straggler']:.3f} | "
                  f"{r['straggler'] / r['i_dev']:.3f} | {r['busy_max_ms']:.2f} | {r['busy_max_model_ms']:.2f} | "
                  f"{r['ep_step_ms']:.2f} | {r['vs_topk']:.2f}x ({lo:.2f}-{hi:.2f}) | {r['ppl_delta_pct']:+.2f} |")
        for note in notes:
            print(f"- {note}")
    model = args.models.split(",")[0]
    tokens = read_tokens(load_tokenizer(model), DATA)
    print(f"\n## combines, {model}, top-k, {args.ranks} ranks: ep_step_ms a decode pass\n")
    print("| batch | all-gather, shared memory | all-gather, gloo | all-reduce, gloo | gloo all-gather / shared |")
    print("|---|---|---|---|---|")
    for B in [int(b) for b in args.combine_batches.split(",")] if "combine" in parts else []:
        t = {}
        for key, combine, shm in (("shm", "allgather", "1"), ("gather", "allgather", "0"), ("reduce", "allreduce", "0")):
            os.environ["TINYMOE_EP_SHM"] = shm  # read by every rank as it joins
            t[key] = bench(model, ["topk"], args.ranks, B, tokens, None, "contiguous", rounds=3, combine=combine,
                           gen_len=16)[0][0]
            t[key] = statistics.median(r.ep_step_ms for r in t[key])
        os.environ.pop("TINYMOE_EP_SHM")
        print(f"| {B} | {t['shm']:.2f} | {t['gather']:.2f} | {t['reduce']:.2f} | {t['gather'] / t['shm']:.2f} |")
    if "collectives" not in parts:
        return
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent),
                                                os.environ.get("PYTHONPATH", "")])
    sizes = [1 << i for i in range(10, 24, 2)]
    times = run_spmd(args.ranks, "ep:collectives", dict(sizes=sizes))
    print(f"\n## collectives alone ({args.ranks} ranks, bf16, median of 20): microseconds\n")
    print("| bytes a rank | gloo all_gather | gloo all_reduce | shared-memory all-gather |")
    print("|---|---|---|---|")
    for n in sizes:
        shm = times.get(("shared", n))
        print(f"| {n} | {1e6 * times[('allgather', n)]:.0f} | {1e6 * times[('allreduce', n)]:.0f} | "
              f"{'-' if shm is None else f'{1e6 * shm:.0f}'} |")
    for name in ("allgather", "allreduce", "shared"):
        points = [(n, times[(name, n)]) for n in sizes if (name, n) in times]
        if len(points) > 1:
            lat, bw = fit(points)
            print(f"{name}: latency {1e6 * lat:.0f} us, bandwidth {bw / 1e9:.2f} GB/s (smallest and largest message)")


if __name__ == "__main__":
    main()
