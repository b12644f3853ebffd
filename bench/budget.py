"""The `budget` router (docs/routing.md, section 3.1) against top-k and LASER on the embedded
models: balance, perplexity and multiple-choice accuracy at a few settings.

    python bench/budget.py [--models tiny,tiny-deepseek] [--settings 0.2,0.35,scan:0.2,scan:0.3]
                           [--batch 64] [--mc N]

A setting is `delta` or `method:delta` (the router's two options; method fill when left out).

Everything is `tinymoe bench`'s and `tinymoe eval`'s own code: the bench's calibration (the first
32768 tokens of the held-out text in windows of 128; no prototype fit, which these routers do not
read), then `tinymoe.benchmark.run` (engine off: no speed columns) with --batch windows decoded
together, teacher forced, 64 prompt + 32 generated tokens: I_agg per decode pass of --batch
tokens (and per prefill pass), perplexity change and top-1 agreement against top-k on the decoded
positions. MC accuracy is `tinymoe eval --data heldout_mc.jsonl --mc-prompt '{question}'`
(`tinymoe.evaluation.multiple_choice`) with the router installed. Prints one markdown table per
model, then the settings meeting the target (I_agg at least 1.5x below top-k's, perplexity
within 1%, MC accuracy within 0.01) on every model.
"""
import argparse
from pathlib import Path

import torch

import tinymoe
from tinymoe import benchmark
from tinymoe.evaluation import multiple_choice, read_choices, read_tokens
from tinymoe.routing import install, make_router
from tinymoe.routing.calibrate import calibrate
from tinymoe.weights import ASSETS

DATA = ASSETS / "data"
TARGET = {"i_agg_ratio": 1.5, "ppl_pct": 1.0, "mc": 0.01}


def rows_for(model, tok, batch: int, settings: list[dict], items: list[dict]) -> list[dict]:
    tokens = read_tokens(tok, DATA / "heldout.txt")
    calib = calibrate(model, tokens[:32768], seq_len=128, proto_steps=0)  # as `tinymoe bench` does
    runs = [("laser", {}, ["laser"])] + [(f"budget {label(o)}", o, ["budget"]) for o in settings]
    out = []
    for tag, opts, routers in runs:
        res = benchmark.run(model, ["topk", *routers], [batch], tokens, calib=calib, router_opts=opts,
                            engine=False)
        by_name = {r.router: r for r in res["rows"]}
        pre = {p["router"]: p for p in res["prefill"]}
        if not out:
            out.append(row("topk", by_name["topk"], pre["topk"], mc(model, tok, items, "topk", calib, {})))
        name = routers[0]
        out.append(row(tag, by_name[name], pre[name], mc(model, tok, items, name, calib, opts), opts or None))
    install(model, "topk")
    return out


def mc(model, tok, items, name, calib, opts) -> float:
    install(model, name, calib, **opts)
    return multiple_choice(model, tok, items, prompt="{question}")["acc"]


def label(opts: dict) -> str:
    return f"{opts['method']} {opts['delta']:g}"


def parse_setting(text: str) -> dict:
    """`delta` or `method:delta` -> the router's options, typed and checked by the router itself."""
    method, _, delta = text.rpartition(":")
    router = make_router("budget", delta=delta, method=method or "fill")
    return {"delta": router.delta, "method": router.method}


def row(tag, r, pre, acc, setting=None) -> dict:
    return {"router": tag, "setting": setting, "i_agg": r.i_agg, "i_agg_prefill": pre["i_agg"],
            "ppl": r.ppl, "ppl_pct": r.ppl_delta_pct, "agree": r.agree_top1, "mc": acc}


def table(name: str, rows: list[dict], batch: int) -> str:
    ref = rows[0]
    lines = [f"### {name}, batch {batch}", "",
             "| router | I_agg (decode) | vs top-k | I_agg (prefill) | ppl | ppl Δ % | top-1 agree | MC acc | MC Δ |",
             "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['router']} | {r['i_agg']:.3f} | {ref['i_agg'] / r['i_agg']:.2f}x | "
                     f"{r['i_agg_prefill']:.3f} | {r['ppl']:.3f} | {r['ppl_pct']:+.2f} | {r['agree']:.3f} | "
                     f"{r['mc']:.4f} | {r['mc'] - ref['mc']:+.4f} |")
    return "\n".join(lines)


def meets(r: dict, ref: dict) -> bool:
    return (ref["i_agg"] / r["i_agg"] >= TARGET["i_agg_ratio"] and abs(r["ppl_pct"]) <= TARGET["ppl_pct"]
            and abs(r["mc"] - ref["mc"]) <= TARGET["mc"])


def main(argv=None):
    ap = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,tiny-deepseek")
    ap.add_argument("--settings", default="0.1,0.2,0.3,0.35,0.4,scan:0.2,scan:0.3",
                    help="budget settings, delta or method:delta, comma-separated")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mc", type=int, default=None, help="score only the first N MC items")
    a = ap.parse_args(argv)
    try:
        settings = [parse_setting(t) for t in a.settings.split(",")]
    except ValueError as e:
        ap.error(f"--settings takes delta or method:delta ({e})")
    torch.manual_seed(0)
    items = read_choices(DATA / "heldout_mc.jsonl")[:a.mc]
    passing = None
    for name in a.models.split(","):
        model, tok = tinymoe.load_model(name), tinymoe.load_tokenizer(name)
        rows = rows_for(model, tok, a.batch, settings, items)
        print(table(name, rows, a.batch), "\n", flush=True)
        ok = {label(r["setting"]) for r in rows[2:] if meets(r, rows[0])}
        passing = ok if passing is None else passing & ok
    print(f"target (I_agg >= {TARGET['i_agg_ratio']}x below top-k, |ppl Δ| <= {TARGET['ppl_pct']}%, "
          f"|MC Δ| <= {TARGET['mc']}) met on every model by: "
          f"{', '.join(sorted(passing)) or 'none'}")


if __name__ == "__main__":
    main()
