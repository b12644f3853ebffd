"""Where a tinymoe decode step goes: time in each native CPU call, in routing, and the rest.

    python bench/step_profile.py [--batch 1] [--router topk] [--prompt-len 128] [--decode-tokens 32]
                                 [--model DIR] [--quant SPEC] [--threads N]

Same checkpoint as bench/decode.py (written to a temp dir without --model). Every call into the
native library (`tinymoe.kernels.native`) and every Python routing call (`MoEBlock.route`: gate,
router, recorder) is timed during the decode steps; the table gives calls and ms per step, and
"rest" is the step minus the native calls (Python, torch ops, routing included). Timing adds ~1
us a call. Last line: the same routing call on the same shapes, alone in a loop, to compare with
its cost inside a step.

With the one-call decode step (models/native_decode.py) a step is one `decode_step_bf16` call
(which contains the routing called back for routers other than topk) plus the LM head;
`TINYMOE_NATIVE_STEP=0` gives the per-op breakdown.
"""
import argparse
import collections
import tempfile
import time
from pathlib import Path

import torch

from decode import fix_threads, write_checkpoint

import tinymoe.kernels.native as native_module


NESTED = " (inside decode_step_bf16)"  # called back from the one-call step: part of its time


class TimedLibrary:
    """Stands in for the loaded library: each function call is timed into `totals`."""

    def __init__(self, lib, totals):
        self._lib, self._totals, self.depth = lib, totals, 0

    def __getattr__(self, name):
        fn = getattr(self._lib, name)

        def timed(*args):
            total = self._totals[name + NESTED if self.depth else name]
            self.depth += 1
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.depth -= 1
                total[0] += 1
                total[1] += time.perf_counter() - start
        return timed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--router", default="topk")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--quant", default=None, help="--quant SPEC for the model (int8, int4, ...)")
    ap.add_argument("--threads", type=int, default=None, help="fixed thread count (default: torch's)")
    args = ap.parse_args()
    fix_threads(args.threads)
    lib = native_module.native()
    if lib is None:
        raise SystemExit("the native library is unavailable here (no compiler or no AVX2)")
    totals = collections.defaultdict(lambda: [0, 0.0])
    timed_lib = TimedLibrary(lib, totals)
    native_module.native = lambda: timed_lib
    import tinymoe.kernels as kernels  # the op modules bound `native` at import: rebind them too
    import tinymoe.models.native_decode as native_decode
    for module in (kernels.cpu_linear, kernels.norm, kernels.rotary, kernels.attention, kernels.activation,
                   native_decode):
        module.native = native_module.native
    from tinymoe.engine import LLM, SamplingParams
    from tinymoe.models.transformer import MoEBlock

    route = MoEBlock.route
    routed = []

    def timed_route(self, flat):
        total = totals["MoEBlock.route (Python)" + (NESTED if timed_lib.depth else "")]
        start = time.perf_counter()
        out = route(self, flat)
        total[0] += 1
        total[1] += time.perf_counter() - start
        routed.append((self, flat.clone()))  # the callback's buffer is reused
        return out
    MoEBlock.route = timed_route

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else write_checkpoint(Path(tmp) / "mixtral-mini")
        llm = LLM(str(path), router=args.router, dtype="bfloat16", max_num_seqs=64, max_batch_tokens=8192,
                  prefix_caching=False, quant=args.quant)
        torch.manual_seed(0)
        prompts = torch.randint(3, 32000, (args.batch, args.prompt_len)).tolist()
        for warm_up in (True, False):
            for p in prompts:
                llm.add_request(p, SamplingParams(temperature=0, max_tokens=1 + args.decode_tokens, ignore_eos=True))
            llm.step()  # the prefill
            totals.clear()
            start, steps = time.perf_counter(), 0
            while llm.has_unfinished():
                llm.step()
                steps += 1
            elapsed = time.perf_counter() - start
    native_ms = sum(t for name, (_, t) in totals.items() if "route" not in name and NESTED not in name) * 1e3 / steps
    print(f"batch {args.batch}, {steps} decode steps, {elapsed * 1e3 / steps:.1f} ms a step\n")
    print("| call | calls / step | ms / step |")
    print("|---|---|---|")
    for name, (calls, seconds) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {calls // steps} | {seconds * 1e3 / steps:.2f} |")
    print(f"| all native calls | | {native_ms:.2f} |")
    print(f"| rest (step - native) | | {elapsed * 1e3 / steps - native_ms:.2f} |")
    inside = [sum(totals[name][i] for name in totals if name.startswith("MoEBlock.route")) for i in (0, 1)]
    if not inside[0]:  # the one-call decode step routed natively
        return
    block, flat = routed[-1]
    runs = 200
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(runs):
            route(block, flat)
    print(f"\nrouting one layer: {inside[1] / inside[0] * 1e6:.0f} us inside a step, "
          f"{(time.perf_counter() - start) / runs * 1e6:.0f} us alone in a loop")


if __name__ == "__main__":
    main()
