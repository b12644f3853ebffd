"""The one-call decode step against the per-op path, in one process, rounds alternating.

    python bench/native_step.py [--router topk] [--batch 1] [--rounds 6] [--decode-tokens 32] [--model DIR]

Same checkpoint as bench/decode.py (written to a temp dir without --model). Each round runs the
same requests once with `Settings.native_step` off (per-op path) and once with it on; every decode
step is timed. Prints the median ms a step of each and their ratio.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from decode import write_checkpoint


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--router", default="topk")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    args = ap.parse_args()
    from tinymoe.engine import LLM, SamplingParams
    from tinymoe.settings import override
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else write_checkpoint(Path(tmp) / "mixtral-mini")
        llm = LLM(str(path), router=args.router, dtype="bfloat16", max_num_seqs=64, max_batch_tokens=8192,
                  prefix_caching=False)
        torch.manual_seed(0)
        prompts = torch.randint(3, 32000, (args.batch, args.prompt_len)).tolist()
        params = SamplingParams(temperature=0, max_tokens=1 + args.decode_tokens, ignore_eos=True)
        steps = {"per-op": [], "one-call": []}
        for _ in range(args.rounds):
            for name, one_call in (("per-op", False), ("one-call", True)):
                with override(native_step=one_call):
                    for p in prompts:
                        llm.add_request(p, params)
                    llm.step()  # the prefill
                    while llm.has_unfinished():
                        start = time.perf_counter()
                        llm.step()
                        steps[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) * 1e3 for name, t in steps.items()}
    print(f"router {args.router}, batch {args.batch}, {args.rounds} rounds of {args.decode_tokens} steps")
    for name, ms in median.items():
        print(f"  {name:8s} {ms:6.1f} ms a step (median)")
    print(f"  one-call speed-up {median['per-op'] / median['one-call']:.2f}x")


if __name__ == "__main__":
    main()
