"""Decode tok/s idle and beside one busy neighbour, per thread count (or auto: the engine's
choice) and OpenMP wait policy.

    python bench/threads.py [--threads 1,2,auto] [--tokens 64] [--runs 3] [--model tiny] [--quant SPEC]

Each row runs in a fresh process, since libgomp reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once,
when torch first loads it. That process times greedy decode of one prompt (the median of --runs)
idle, then again while it keeps a `while True: pass` process running beside it."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (label, environment): the OpenMP variables each row sets; the others are removed. --policies
# also takes any spin=N (GOMP_SPINCOUNT=N: spin N rounds, then sleep).
POLICIES = [("default", {}), ("active", {"OMP_WAIT_POLICY": "active"}),
            ("passive", {"OMP_WAIT_POLICY": "passive"}), ("spin=0", {"GOMP_SPINCOUNT": "0"}),
            ("spin=1000", {"GOMP_SPINCOUNT": "1000"}), ("spin=10000", {"GOMP_SPINCOUNT": "10000"})]
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "TINYMOE_WAIT_POLICY")

CHILD = r"""
import json, statistics, subprocess, sys
import torch
from tinymoe import LLM, SamplingParams, Settings
threads = None if sys.argv[1] == "auto" else int(sys.argv[1])  # auto: the engine's thread governor
tokens, runs = map(int, sys.argv[2:4])
llm = LLM(sys.argv[4], quant=sys.argv[5] or None, settings=Settings(threads=threads))
params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)

def rate():
    llm.generate("Once upon a time", params)  # warm-up
    return statistics.median(llm.generate("Once upon a time", params)[0].decode_tokens_per_s for _ in range(runs))

idle = rate()
neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
try:
    busy = rate()
finally:
    neighbour.kill()
    neighbour.wait()
print(json.dumps({"idle": idle, "busy": busy, "threads": torch.get_num_threads()}))
"""


def measure(threads: str, env_vars: dict, tokens: int, runs: int, model: str, quant: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    env.update(env_vars, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(tokens), str(runs), model, quant], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"threads={threads} {env_vars}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2,auto",
                    help="comma-separated thread counts; auto: the engine chooses (engine/cpu_share.py)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens a run")
    ap.add_argument("--runs", type=int, default=3, help="runs a figure (the median)")
    ap.add_argument("--model", default="tiny", help="model name or checkpoint dir (default: the embedded model)")
    ap.add_argument("--quant", default="", help="--quant SPEC for the model")
    ap.add_argument("--policies", default=",".join(p for p, _ in POLICIES),
                    help=f"comma-separated subset of {', '.join(p for p, _ in POLICIES)}")
    args = ap.parse_args()
    known = dict(POLICIES)
    chosen = []
    for label in args.policies.split(","):
        if label.startswith("spin=") and label[5:].isdigit():
            known[label] = {"GOMP_SPINCOUNT": label[5:]}
        elif label not in known:
            ap.error(f"unknown policy {label!r}: use {', '.join(known)} or spin=N")
        chosen.append(label)
    print("| threads | policy | idle t/s | busy t/s | ratio |")
    print("|---|---|---|---|---|")
    for threads in args.threads.split(","):
        if threads != "auto" and not (threads.isdigit() and int(threads) > 0):
            ap.error(f"--threads {threads!r}: give positive counts or auto")
        for label in chosen:
            got = measure(threads, known[label], args.tokens, args.runs, args.model, args.quant)
            print(f"| {threads} | {label} | {got['idle']:.0f} | {got['busy']:.0f} | {got['busy'] / got['idle']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
