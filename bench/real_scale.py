"""A real-size checkpoint on this machine: DeepSeek-MoE-16B's exact shapes with random weights,
loaded quantised; peak RSS, load time and decode t/s at batch 1 and 8 against the limit.

    python bench/real_scale.py [--layers 28] [--quant int8,int4] [--batches 1,8] [--runs 3]
                               [--model DIR] [--max-rss-gb 20]

The checkpoint (about 33 GB bf16 at 28 layers, shards of 4 GB) is written once by the shared
make_deepseek.py into $PEERS/models/deepseek-<layers>L unless it exists. Each --quant runs in a
fresh process, so its peak RSS (getrusage's high-water mark) is its own: `LLM(dir, quant=...)`
(quantised while loading), then bench/decode.py's measurement with the protocol of
/work/shared/peers/README.md (128-id prompts of RandomState(1), 64 decode steps, median of
--runs after a warm-up). Limit: the read bandwidth of the shared membw.py, measured first, over
limits_deepseek.py's bytes a step (nominal, scales excluded) and over the loaded model's own
(bench/peers.py's count, scales included). Before writing or loading, the disk space and the
expected resident size (quantised weights, embedding bf16, KV cache, 1 GiB of slack) are checked
against the free disk, MemAvailable and --max-rss-gb. Not in CI.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import peers  # noqa: E402  (bench/peers.py: the shared scripts, byte counts)

H, V, GiB = 2048, 102400, 2**30
QUANTS = ("int8", "int4")
# bytes a parameter of a quantised matrix takes, scales included (int4: group 64, scale and zero)
BYTES_PER_PARAM = {"int8": 1.0 + 2 / 2048, "int4": 0.5 + 4 / 64}


def checkpoint_params(layers: int) -> int:
    """Parameters of make_deepseek.py's checkpoint: limits_deepseek.py's shapes, every expert."""
    attn, dense, expert = 4 * H * H, 3 * H * 10944, 3 * H * 1408
    moe = 64 * H + 64 * expert + 2 * expert
    return 2 * V * H + layers * (attn + 2 * H) + dense + (layers - 1) * moe + H


def expected_rss(layers: int, quant: str) -> float:
    embed = V * H
    weights = 2 * embed + (checkpoint_params(layers) - embed) * BYTES_PER_PARAM[quant]
    return weights + (512 << 20) + GiB  # the LLM's default KV budget and slack


def mem_available() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return float("inf")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--quant", default="int8,int4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model", default=None, help="checkpoint dir (default $PEERS/models/deepseek-<layers>L)")
    ap.add_argument("--max-rss-gb", type=float, default=20.0, help="refuse a load expected to need more")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not 2 <= a.layers <= 28:
        ap.error(f"--layers must be between 2 and 28 (DeepSeek-MoE-16B has 28), got {a.layers}")
    a.quant = peers.csv(a.quant, QUANTS, "quant", ap)
    a.batches = peers.csv(a.batches, ("1", "8"), "batch", ap, int)
    if a.runs < 1:
        ap.error(f"--runs must be at least 1, got {a.runs}")
    a.model = Path(a.model) if a.model else peers.PEERS / "models" / f"deepseek-{a.layers}L"
    if a.child:
        return a
    for script in ("make_deepseek.py", "membw.py", "limits_deepseek.py"):
        if not (peers.SHARED / script).is_file():
            ap.error(f"missing {peers.SHARED / script}: the shared peers scripts (set PEERS_SCRIPTS)")
    if not peers.llama_python().is_file():
        ap.error(f"missing {peers.llama_python()}: make it with `bash {peers.SHARED}/build_llama.sh`")
    for q in a.quant:
        need = expected_rss(a.layers, q)
        if need > a.max_rss_gb * 1e9:
            ap.error(f"{q} at {a.layers} layers needs about {need / 1e9:.1f} GB resident, over "
                     f"--max-rss-gb {a.max_rss_gb:g}")
        if need > mem_available():
            ap.error(f"{q} at {a.layers} layers needs about {need / 1e9:.1f} GB resident, "
                     f"only {mem_available() / 1e9:.1f} GB available")
    if not (a.model / "config.json").is_file():
        disk = 2 * checkpoint_params(a.layers) * 1.01
        a.model.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(a.model.parent).free
        if disk > free:
            ap.error(f"writing {a.model} needs {disk / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free")
    return a


def child(a):
    """One quantisation in this process: load, measure, print one JSON line."""
    import torch
    import decode
    torch.set_num_threads(peers.THREADS)
    prompts = np.random.RandomState(1).randint(3, 32000, size=(8, peers.PROMPT)).tolist()
    (q,) = a.quant
    t0 = time.perf_counter()
    measure = decode.bench_tinymoe(a.model, prompts, quant=q)
    load_s = time.perf_counter() - t0
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    own = peers.tinymoe_step_bytes(measure.llm.model, a.batches)
    out = dict(quant=q, layers=a.layers, load_s=load_s, peak_rss_load=rss_load, bytes_per_step=own)
    for b in a.batches:
        measure(b, 4)  # warm-up
        times = [measure(b, peers.NEW) for _ in range(a.runs)]
        out[f"b{b}"] = dict(prefill_tps=b * peers.PROMPT / np.median([t for t, _ in times]),
                            decode_tps=b * peers.NEW / np.median([t for _, t in times]))
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out), flush=True)


def main(argv=None):
    a = parse_args(argv)
    if a.child:
        return child(a)
    if not (a.model / "config.json").is_file():
        print(f"writing {a.model} ({a.layers} layers)", file=sys.stderr, flush=True)
        peers.peer("make_deepseek.py", a.model, a.layers)
    mem, _ = peers.peer("membw.py")
    bw = mem[-1]["t2_read_2GiB_fp32_sum"]["best_GBps"]
    lim, _ = peers.peer("limits_deepseek.py", bw, 64 * (1 - (58 / 64) ** 8), a.layers)
    limits = lim[-1]
    print(f"read bandwidth {bw:.1f} GB/s (membw.py, 2 threads)", file=sys.stderr, flush=True)
    rows = []
    for q in a.quant:
        cmd = [sys.executable, __file__, "--child", "--quant", q, "--layers", str(a.layers), "--model",
               str(a.model), "--batches", ",".join(map(str, a.batches)), "--runs", str(a.runs)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"{q}: the measuring process failed (exit {done.returncode}): {tail}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        nominal = limits[f"deepseek-{a.layers}L/{q}"]
        nominal = {1: nominal["bytes_per_token"], 8: nominal["bytes_per_step_b8"]}
        for b in a.batches:
            own = row["bytes_per_step"][str(b)]  # JSON keys are strings
            c = row[f"b{b}"]
            c["limit_tps"] = b * bw * 1e9 / nominal[b]
            c["own_limit_tps"] = b * bw * 1e9 / own
            c["share_of_own_limit"] = c["decode_tps"] / c["own_limit_tps"]
        rows.append(row)
        print(f"  {q}: load {row['load_s']:.1f} s, peak RSS {row['peak_rss'] / GiB:.2f} GiB", file=sys.stderr,
              flush=True)
    print(json.dumps({"bandwidth_GBps": bw, "layers": a.layers, "rows": rows}))
    print()
    head = "| layers | weights | load s | peak RSS GiB |"
    for b in a.batches:
        head += f" decode b{b} t/s | limit b{b} | own limit b{b} | share b{b} |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        line = f"| {r['layers']} | {r['quant']} | {r['load_s']:.1f} | {r['peak_rss'] / GiB:.2f} |"
        for b in a.batches:
            c = r[f"b{b}"]
            line += (f" {c['decode_tps']:.1f} | {c['limit_tps']:.1f} | {c['own_limit_tps']:.1f} |"
                     f" {c['share_of_own_limit']:.2f} |")
        print(line)


if __name__ == "__main__":
    main()
