"""Two revisions of the whole engine, A/B in alternating processes: decode tokens/s of one model.

    python bench/rev_ab.py --base REV [--model DIR] [--quant SPEC] [--batch 1] [--tokens 200]
                           [--seconds 12] [--rounds 3] [--threads 2]

A is git revision REV, checked out in a temporary worktree; B is the working tree. For changes
outside the kernel sources (Python glue, the engine loop), which bench/native_ab.py cannot swap
inside one process. Each round runs one fresh process per side, A and B in turn (B first every
other round), so a noisy host's slow phases fall on both: it loads the model, warms up, then
runs greedy generations of --tokens new tokens from 16-token prompts (EOS ignored, no prefix
cache) for --seconds, and reports the median decode tokens/s. Prints each round's figures and
B / A, then the median of the B / A ratios. Without --model, bench/decode.py's Mixtral-shaped
random checkpoint is written to a temp dir.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import statistics, sys, time
from dataclasses import replace
import torch
from tinymoe import settings
from tinymoe.engine import LLM, SamplingParams
path, quant, seconds = sys.argv[1], sys.argv[2] or None, float(sys.argv[6])
batch, tokens, threads = map(int, sys.argv[3:6])
torch.set_num_threads(threads)
settings.install(replace(settings.current(), threads=threads))  # no thread governor mid-measurement
llm = LLM(path, dtype="bfloat16", quant=quant, prefix_caching=False)
vocab = llm.runner.model.config.vocab_size
prompts = torch.randint(3, vocab, (batch, 16), generator=torch.Generator().manual_seed(0)).tolist()

def rate(n):
    for p in prompts:
        llm.add_request(p, SamplingParams(temperature=0, max_tokens=1 + n, ignore_eos=True))
    llm.step()  # the prefill
    start = time.perf_counter()
    while llm.has_unfinished():
        llm.step()
    return batch * n / (time.perf_counter() - start)

rate(4)  # warm-up
rates, end = [], time.perf_counter() + seconds
while time.perf_counter() < end or len(rates) < 3:
    rates.append(rate(tokens))
print(statistics.median(rates))
"""


def run(tree: Path, args) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.model), args.quant or "", str(args.batch),
                          str(args.tokens), str(args.threads), str(args.seconds)],
                         cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{tree}: the measuring process failed:\n{out.stderr.strip()}")
    return float(out.stdout.split()[-1])


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments; a revision git does not know, a model dir without config.json or counts
    below 1 are one line."""
    ap = argparse.ArgumentParser(prog="rev_ab.py", description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision of A")
    ap.add_argument("--model", help="checkpoint dir (default: bench/decode.py's random Mixtral shape)")
    ap.add_argument("--quant", help="--quant SPEC for the model (int8, int4, ...)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=200, help="new tokens a generation")
    ap.add_argument("--seconds", type=float, default=12.0, help="generations a process runs for")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    known = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "-q", f"{args.base}^{{commit}}"],
                           capture_output=True)
    if known.returncode:
        ap.error(f"--base {args.base}: not a revision of {REPO}")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        ap.error(f"--model {args.model}: no config.json there")
    low = [f"--{k} {v}" for k, v in vars(args).items() if k in ("batch", "tokens", "seconds", "rounds", "threads")
           and v < 1]
    if low:
        ap.error(f"{', '.join(low)}: must be at least 1")
    return args


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base), args.base],
                       check=True)
        try:
            if args.model is None:
                sys.path.insert(0, str(REPO / "bench"))
                from decode import write_checkpoint
                args.model = write_checkpoint(Path(tmp) / "mixtral-mini")
            print(f"A {args.base}, B the working tree; {args.quant or 'bf16'}, batch {args.batch}, "
                  f"{args.threads} threads, {args.rounds} rounds")
            ratios = []
            for r in range(args.rounds):
                sides = [("A", base), ("B", REPO)]
                rates = dict((name, run(tree, args)) for name, tree in (sides if r % 2 == 0 else sides[::-1]))
                ratios.append(rates["B"] / rates["A"])
                print(f"round {r + 1}: A {rates['A']:.1f} t/s, B {rates['B']:.1f} t/s, B / A {ratios[-1]:.2f}",
                      flush=True)
            print(f"B / A median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=True)


if __name__ == "__main__":
    main()
