"""The one-call decode step against the per-op path, in one process, rounds alternating.

    python bench/native_step.py [--router topk] [--batch 1] [--rounds 6] [--decode-tokens 32]
                                [--quant none,int8,int4] [--model DIR]

Same checkpoint as bench/decode.py (written to a temp dir without --model). For each --quant spec
(`load_model`'s: "none" = the checkpoint's bf16; "int8", "int4", or per part such as
"experts=int4,attn=int8") the model is loaded once, and each round runs the same requests once
with `Settings.native_step` off (per-op path) and once with it on; every decode step is timed.
Prints per spec the median ms a step of each and their ratio.
"""
import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from decode import fix_threads, write_checkpoint


def step_times(llm, prompts, params, rounds: int) -> dict[str, float]:
    from tinymoe.settings import override
    steps = {"per-op": [], "one-call": []}
    for _ in range(rounds):
        for name, one_call in (("per-op", False), ("one-call", True)):
            with override(native_step=one_call):
                for p in prompts:
                    llm.add_request(p, params)
                llm.step()  # the prefill
                while llm.has_unfinished():
                    start = time.perf_counter()
                    llm.step()
                    steps[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in steps.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--router", default="topk")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--quant", default="none", help="comma-separated load_model quant specs; none = bf16")
    args = ap.parse_args()
    fix_threads()
    from tinymoe.engine import LLM, SamplingParams
    from tinymoe.models.quantize import parse_quant
    specs = [q.strip() for q in args.quant.split(",")]
    for q in specs:
        if q != "none":
            parse_quant(q)  # a bad spec fails before the checkpoint is written
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else write_checkpoint(Path(tmp) / "mixtral-mini")
        torch.manual_seed(0)
        prompts = torch.randint(3, 32000, (args.batch, args.prompt_len)).tolist()
        params = SamplingParams(temperature=0, max_tokens=1 + args.decode_tokens, ignore_eos=True)
        print(f"router {args.router}, batch {args.batch}, {args.rounds} rounds of {args.decode_tokens} steps")
        print(f"  {'weights':40s} {'per-op ms':>9s} {'one-call ms':>11s} {'speed-up':>8s}")
        for q in specs:
            llm = LLM(str(path), router=args.router, dtype="bfloat16", max_num_seqs=64, max_batch_tokens=8192,
                      prefix_caching=False, quant=None if q == "none" else q)
            median = step_times(llm, prompts, params, args.rounds)
            print(f"  {q:40s} {median['per-op']:9.1f} {median['one-call']:11.1f} "
                  f"{median['per-op'] / median['one-call']:7.2f}x", flush=True)
            del llm
            gc.collect()


if __name__ == "__main__":
    main()
