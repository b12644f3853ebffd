"""tinymoe bf16 / int8 / int4 beside llama.cpp bf16 / Q8_0 / Q4_0 and transformers bf16, on the
shared peer checkpoints (mixtral-mini, deepseek-3L), in one run, each against its own limit.

    python bench/peers.py [--engines tinymoe,llama.cpp,transformers] [--precisions bf16,int8,int4]
                          [--models mixtral-mini,deepseek-3L] [--batches 1,8] [--runs 1] [--rounds 3]

The protocol of /work/shared/peers/README.md: the same 128-id prompts
(numpy RandomState(1).randint(3, 32000, (8, 128)), row 0 at batch 1, rows 0-7 at batch 8),
greedy, EOS ignored, 64 decode steps after the prefill's token, median of --runs after a warm-up,
2 threads (fixed), one engine at a time. The whole list of rows runs --rounds times over, each
round measuring the bandwidth first: this host's speed drifts by +-20% over minutes, so every
figure is the median over rounds, and the tinymoe / llama.cpp ratios (printed after the table) are
the median and range of the ratios within each round. tinymoe is bench/decode.py's measurement (LLM with quant=);
llama.cpp is the shared llama_bench.py (--fa 1), transformers the shared hf_bench.py
(--impl grouped_mm --cache static; it has no DeepSeek-MoE v1 class, so mixtral-mini only).

Limits: the read bandwidth is the shared membw.py's (2 threads, 2 GiB fp32 sum, best of 7),
the median of the rounds' measurements. "limit" is limits.py / limits_deepseek.py at that bandwidth
(weight bytes of one decode step at 2 / 1 / 0.5 bytes a parameter, scales excluded; batch 8
reads the expected union of experts under uniform routing). "own" is the same bandwidth over the
bytes the engine's own weights take for one step: llama.cpp the GGUF's (the shared gguf_bytes.py,
scales included; batch 8 the same rule with the union of experts), tinymoe its loaded model's
(every weight but the embedding, quantised tensors with their scales, experts as stored),
transformers the bf16 limit's. share = decode t/s / own limit t/s.

tinymoe runs with the installed settings: `TINYMOE_BATCH_INVARIANT=0` lets its many-row matmuls
(prefill, large batches) take torch's GEMM instead of the batch-invariant native kernels; the
header and the JSON say which ran.
"""
import argparse
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
PEERS = Path(os.environ.get("PEERS", Path.home() / ".cache" / "peers"))
SHARED = Path(os.environ.get("PEERS_SCRIPTS", "/work/shared/peers"))
README = SHARED / "README.md"
ENGINES = ("tinymoe", "llama.cpp", "transformers")
PRECISIONS = ("bf16", "int8", "int4")
LLAMA_TYPE = {"bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}
MODELS = ("mixtral-mini", "deepseek-3L")
LIMITS = {"mixtral-mini": ["limits.py"], "deepseek-3L": ["limits_deepseek.py"]}
PROMPT, NEW, THREADS = 128, 64, 2
# How each peer file is made (README's set-up; deepseek-3L's q8_0/q4_0 by quantize.py from bf16).
MAKE = {
    "venv": "bash {S}/build_llama.sh",
    "mixtral-mini": "$V {S}/make_models.py {P}/models mini, then {S}/make_tokenizer.py",
    "deepseek-3L": "$V {S}/make_deepseek.py {P}/models/deepseek-3L 3, then {S}/make_bpe_tokenizer.py",
    "mixtral-mini-bf16": "$V $CONV {P}/models/mixtral-mini --outtype bf16 --outfile {f}",
    "mixtral-mini-q8_0": "$V $CONV {P}/models/mixtral-mini --outtype q8_0 --outfile {f}",
    "mixtral-mini-q4_0": "$V {S}/quantize.py {P}/gguf/mixtral-mini-bf16.gguf {f} q4_0",
    "deepseek-3L-bf16": "$V {S}/convert_deepseek.py $CONV {P}/models/deepseek-3L --outtype bf16 --outfile {f}",
    "deepseek-3L-q8_0": "$V {S}/quantize.py {P}/gguf/deepseek-3L-bf16.gguf {f} q8_0",
    "deepseek-3L-q4_0": "$V {S}/quantize.py {P}/gguf/deepseek-3L-bf16.gguf {f} q4_0",
}


def llama_python() -> Path:
    return PEERS / "venv-llama" / "bin" / "python"


def gguf_path(model: str, prec: str) -> Path:
    return PEERS / "gguf" / f"{model}-{LLAMA_TYPE[prec]}.gguf"


def csv(text, valid, what, ap, convert=str):
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    bad = [s for s in items if s not in valid]
    if bad or not items:
        ap.error(f"unknown {what} {','.join(bad) or repr(text)} (valid: {', '.join(valid)})")
    return [convert(s) for s in items]


def rows_of(a) -> list[tuple[str, str, str]]:
    """(model, engine, precision) in run order, the engines of one precision next to each other (the
    ratios compare neighbours in time); transformers only bf16 and only on Mixtral."""
    return [(m, e, p) for m in a.models for p in a.precisions for e in a.engines
            if e != "transformers" or (p == "bf16" and m == "mixtral-mini")]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=1, help="runs of a row within a round (their median)")
    ap.add_argument("--rounds", type=int, default=3, help="times the whole list of rows runs (the median)")
    a = ap.parse_args(argv)
    a.engines = csv(a.engines, ENGINES, "engine", ap)
    a.precisions = csv(a.precisions, PRECISIONS, "precision", ap)
    a.models = csv(a.models, MODELS, "model", ap)
    a.batches = csv(a.batches, ("1", "8"), "batch", ap, int)  # the protocol's prompts and limits
    if a.runs < 1 or a.rounds < 1:
        ap.error(f"--runs and --rounds must be at least 1, got {a.runs} and {a.rounds}")
    rows = rows_of(a)
    if not rows:
        ap.error("nothing to run: transformers runs only bf16 on mixtral-mini")
    missing = missing_files(rows)
    if missing:
        ap.error(missing)
    if any(e == "tinymoe" and p != "bf16" for _, e, p in rows) and not tinymoe_has_quant():
        ap.error("tinymoe's LLM has no quant= argument yet: run with --precisions bf16 or without tinymoe")
    return a


def missing_files(rows) -> str | None:
    """The first peer file the run needs that is absent, with the set-up step that makes it."""
    def say(path, key, f=""):
        cmd = MAKE[key].format(S=SHARED, P=PEERS, f=f)
        return f"missing {path}: make it with `{cmd}` (set-up in {README})"
    for script in ("membw.py", "limits.py", "limits_deepseek.py", "llama_bench.py", "hf_bench.py",
                   "gguf_bytes.py"):
        if not (SHARED / script).is_file():
            return f"missing {SHARED / script}: the shared peers scripts (set PEERS_SCRIPTS to their directory)"
    if not llama_python().is_file():
        return say(llama_python(), "venv")
    for model in sorted({m for m, _, _ in rows}):
        if not (PEERS / "models" / model / "config.json").is_file():
            return say(PEERS / "models" / model, model)
    for model, engine, prec in rows:
        if engine == "llama.cpp" and not gguf_path(model, prec).is_file():
            f = gguf_path(model, prec)
            return say(f, f"{model}-{LLAMA_TYPE[prec]}", f)
    return None


def tinymoe_has_quant() -> bool:
    from tinymoe.engine import LLM
    return "quant" in inspect.signature(LLM).parameters


def peer(script: str, *args) -> list[dict]:
    """Run a shared script in the llama venv; its JSON lines."""
    cmd = [str(llama_python()), str(SHARED / script), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"{script} {' '.join(map(str, args))} failed (exit {done.returncode}): {tail}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")], done.stdout


def union(experts: int, k: int, batch: int) -> float:
    """Expected distinct experts a batch's tokens touch in one layer under uniform routing."""
    return experts * (1 - (1 - k / experts) ** batch)


# gguf_bytes.py's rule (skip token_embd, experts *_exps), split into dense and expert bytes so
# that batch 8 can count the union of experts.
GGUF_SPLIT = """
import json, os, sys
sys.path.insert(0, sys.argv[2])
import gguf
r = gguf.GGUFReader(sys.argv[1])
kv = {f.name: f for f in r.fields.values()}
arch = bytes(kv["general.architecture"].parts[-1]).decode()
n = lambda key: int(kv[f"{arch}.{key}"].parts[-1][0])
dense = sum(int(t.n_bytes) for t in r.tensors if not t.name.startswith("token_embd") and "_exps" not in t.name)
exps = sum(int(t.n_bytes) for t in r.tensors if "_exps" in t.name)
print(json.dumps(dict(dense=dense, experts=exps, E=n("expert_count"), k=n("expert_used_count"))))
"""


def gguf_step_bytes(path: Path, batches) -> dict[int, float]:
    _, out = peer("gguf_bytes.py", path)
    quoted = float(re.search(r"per-decode-token weight bytes ([0-9.]+) GB", out).group(1)) * 1e9
    gguf_py = PEERS / "src/llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py"
    done = subprocess.run([str(llama_python()), "-c", GGUF_SPLIT, str(path), str(gguf_py)],
                          capture_output=True, text=True, check=True)
    s = json.loads(done.stdout)
    per = {b: s["dense"] + s["experts"] * union(s["E"], s["k"], b) / s["E"] for b in batches}
    if abs(s["dense"] + s["experts"] * s["k"] / s["E"] - quoted) > 1e5:  # gguf_bytes prints 0.1 MB
        raise RuntimeError(f"{path}: split {per} disagrees with gguf_bytes.py's {quoted:.0f} bytes a token")
    return per


def tinymoe_step_bytes(model, batches) -> dict[int, float]:
    """Bytes one decode step reads from the loaded model: every weight tensor once (quantised
    codes with their scales) except the embedding (one row) and the routed experts, plus per MoE
    layer the expected union of its experts at that batch, each at its stored copy's bytes."""
    import torch.nn as nn
    from tinymoe.experts import Experts
    seen, dense = set(), 0
    skip = {id(t) for m in model.modules() if isinstance(m, (nn.Embedding, Experts))
            for t in (*m.parameters(), *m.buffers())}
    for t in (*model.parameters(), *model.buffers()):
        if id(t) in skip or t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        dense += t.numel() * t.element_size()
    cfg = model.config
    per_copy = [b.experts.weight_bytes() / len(b.experts.plan.copies) for b in model.moe_blocks()]
    return {b: dense + sum(per_copy) * union(cfg.num_experts, cfg.top_k, b) for b in batches}


def run_tinymoe(model_dir: Path, prec: str, batches, runs, prompts):
    sys.path.insert(0, str(BENCH))
    import decode  # bench/decode.py: its measurement of tinymoe
    opts = {} if prec == "bf16" else {"quant": prec}
    measure = decode.bench_tinymoe(model_dir, prompts, **opts)
    step_bytes = tinymoe_step_bytes(measure.llm.model, batches)
    out = {}
    for b in batches:
        measure(b, 4)  # warm-up
        times = [measure(b, NEW) for _ in range(runs)]
        out[b] = (b * PROMPT / statistics.median(t for t, _ in times),
                  b * NEW / statistics.median(t for _, t in times))
    return out, step_bytes


def summary(lines):
    s = next(x for x in lines if x.get("summary"))
    return s["prefill_tps"]["median"], s["decode_tps"]["median"]


def measure_row(model: str, engine: str, prec: str, a, prompts) -> tuple[dict, dict, str]:
    """{batch: (prefill t/s, decode t/s)}, {batch: the engine's own bytes a step}, its weights' name."""
    model_dir = PEERS / "models" / model
    if engine == "tinymoe":
        speeds, own = run_tinymoe(model_dir, prec, a.batches, a.runs, prompts)
        return speeds, own, prec
    if engine == "llama.cpp":
        f = gguf_path(model, prec)
        speeds = {b: summary(peer("llama_bench.py", f, "--batch", b, "--fa", 1, "--reps", a.runs)[0])
                  for b in a.batches}
        return speeds, gguf_step_bytes(f, a.batches), LLAMA_TYPE[prec].upper()
    speeds = {b: summary(peer("hf_bench.py", model_dir, "--impl", "grouped_mm", "--cache", "static",
                              "--batch", b, "--reps", a.runs)[0]) for b in a.batches}
    return speeds, None, "bf16"


def ratio_lines(per_round: list[dict], a) -> list[str]:
    """tinymoe / llama.cpp decode at the same precision and batch: median (range) of the rounds' ratios."""
    lines = []
    for model in a.models:
        for prec in a.precisions:
            cells = []
            for b in a.batches:
                r = [rnd[(model, "tinymoe", prec)][b][1] / rnd[(model, "llama.cpp", prec)][b][1]
                     for rnd in per_round if (model, "tinymoe", prec) in rnd and (model, "llama.cpp", prec) in rnd]
                if r:
                    cells.append(f"b{b} {statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})")
            if cells:
                lines.append(f"{model} {prec}: tinymoe / llama.cpp decode " + ", ".join(cells))
    return lines


def main(argv=None):
    a = parse_args(argv)
    from tinymoe import settings
    import decode  # bench/decode.py
    decode.fix_threads(THREADS)
    invariant = settings.current().batch_invariant
    prompts = np.random.RandomState(1).randint(3, 32000, size=(8, PROMPT)).tolist()
    rows = rows_of(a)
    per_round, bandwidths, own, weights = [], [], {}, {}
    for rnd in range(a.rounds):
        mem, _ = peer("membw.py")
        bandwidths.append(mem[-1]["t2_read_2GiB_fp32_sum"]["best_GBps"])
        print(f"round {rnd + 1} of {a.rounds}: read bandwidth {bandwidths[-1]:.1f} GB/s (membw.py, 2 threads); "
              f"{THREADS} threads; prompt {PROMPT}, decode {NEW}, median of {a.runs}; "
              f"tinymoe batch_invariant={invariant}", file=sys.stderr, flush=True)
        speeds = {}
        for row in rows:
            speeds[row], own[row], weights[row] = measure_row(*row, a, prompts)
            print(f"  {row[0]} {row[1]} {weights[row]}: " + ", ".join(
                f"b{b} prefill {speeds[row][b][0]:.0f} decode {speeds[row][b][1]:.1f}" for b in a.batches),
                file=sys.stderr, flush=True)
        per_round.append(speeds)
    bw = statistics.median(bandwidths)
    limits = {}
    for model in a.models:
        lines, _ = peer(*LIMITS[model], bw)
        limits.update(lines[-1])
    results = []
    for row in rows:
        model, engine, prec = row
        nominal = limits[f"{model}/{prec}"]
        nominal_bytes = {1: nominal["bytes_per_token"], 8: nominal["bytes_per_step_b8"]}
        step_bytes = own[row] or nominal_bytes
        result = {"model": model, "engine": engine, "weights": weights[row], "bandwidth_GBps": bw}
        for b in a.batches:
            prefill = statistics.median(rnd[row][b][0] for rnd in per_round)
            decode_tps = statistics.median(rnd[row][b][1] for rnd in per_round)
            own_limit = b * bw * 1e9 / step_bytes[b]
            result[f"b{b}"] = dict(prefill_tps=prefill, decode_tps=decode_tps, bytes_per_step=step_bytes[b],
                                   own_limit_tps=own_limit, share_of_own_limit=decode_tps / own_limit,
                                   limit_tps=b * bw * 1e9 / nominal_bytes[b])
        results.append(result)
    ratios = ratio_lines(per_round, a)
    print(json.dumps({"bandwidth_GBps": bw, "bandwidths_GBps": bandwidths, "runs": a.runs, "rounds": a.rounds,
                      "tinymoe_batch_invariant": invariant, "rows": results, "ratios": ratios}))
    print()
    head = "| model | engine | weights | prefill b1 t/s |"
    for b in a.batches:
        head += f" decode b{b} t/s | limit b{b} | own limit b{b} | share b{b} |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        line = f"| {r['model']} | {r['engine']} | {r['weights']} | "
        line += f"{r['b1']['prefill_tps']:.0f} |" if "b1" in r else "- |"
        for b in a.batches:
            c = r[f"b{b}"]
            line += (f" {c['decode_tps']:.1f} | {c['limit_tps']:.1f} | {c['own_limit_tps']:.1f} |"
                     f" {c['share_of_own_limit']:.2f} |")
        print(line)
    print()
    for line in ratios:
        print(line)


if __name__ == "__main__":
    main()
