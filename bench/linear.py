"""bf16 against int8 and int4 weights in `tinymoe.kernels.linear`, in the same process.

    python bench/linear.py [--shapes 4096x4096,14336x4096] [--rows 1,8,64] [--runs 5] [--force-native]
    python bench/linear.py --routes [--shapes 4096x1024,1024x4096,7168x1024] [--rows 1-64]
                           [--precisions bf16,int8,int4]

Per weight shape N x K and row count M: the median time of one x [M, K] @ w[N, K].T over enough
different weights that they do not fit in the caches, as GB/s of weight bytes read (int8 / int4:
codes and scales, `QWeight.nbytes`) and GFLOP/s, and each precision's speed-up over bf16 in the
same run. First the machine's paths: which integer dot products the library was built with
(`cpu_linear.isa()`, Settings.native_isa), whether the CPU counts as having bf16 instructions (then
more than 16 rows go to torch's bf16 GEMM, int8/int4 as `cpu_linear.quant_native` decides, unless
--force-native), and, for scale, torch's plain `sum` over bf16 weights. Pause other work on the
machine first: with two threads on two vCPUs, any other busy process slows OpenMP kernels many
times over.

--routes: each row count (--rows takes ranges, 1-64) through both routes of a matmul, forced (the
native kernel; torch's GEMM, an int8/int4 weight dequantised to bf16 first), rounds alternating, each
round over enough weights that they come from memory as in a model's step (with
Settings.batch_invariant off, which otherwise keeps every row count native), and which route the rule
picks (`quant_native`, bf16: NATIVE_MAX_ROWS_WITH_BF16); then per shape and precision the row count
from which the GEMM wins at every larger count: the measurement behind cpu_linear's
QUANT_NATIVE_MAX_ROWS and NATIVE_MAX_ROWS_WITH_BF16.
"""
import argparse
import statistics
import time

import torch

from tinymoe import settings
from tinymoe.kernels import cpu_linear
from tinymoe.kernels.quant import quantize

CACHE_BYTES = 64 << 20  # the int4 weights of one shape at least this many bytes


def median_time(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def row_counts(text: str) -> list[int]:
    """"1-64" or "1,8,64" (ranges and single counts, comma-separated)."""
    rows = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        rows += range(int(lo), int(hi or lo) + 1)
    if not rows or min(rows) < 1:
        raise SystemExit(f"--rows {text!r}: row counts must be at least 1")
    return rows


def crossover(rows: list[int], ratio: dict[int, float]) -> str:
    """The row count from which the GEMM route wins at every larger count measured (ratio =
    GEMM time / native time < 1), and the last count where the native kernel still wins."""
    native_wins = [m for m in rows if ratio[m] >= 1]
    if native_wins and native_wins[-1] == rows[-1]:
        return f"native still wins at {rows[-1]}"
    after = [m for m in rows if m > max(native_wins, default=0)]
    return f"GEMM from {after[0]} on; native last wins at {max(native_wins, default='-')}"


def routes(args):
    """Each row count through both routes of a matmul, forced, rounds alternating; each round
    runs over enough weights that they come from memory, as in a model's step."""
    rows = row_counts(args.rows)
    print(f"threads {torch.get_num_threads()}; int8/int4 dot products: {cpu_linear.isa()}; bf16 instructions: "
          f"{cpu_linear.native_bf16()}; median of {args.runs} alternating rounds, each over weights of at "
          f"least {CACHE_BYTES >> 20} MiB\n")
    print("| N x K | rows | weights | native us | GEMM us | GEMM / native | rule picks |")
    print("|---|---|---|---|---|---|---|")
    summary = []
    # batch invariance keeps every row count native: the rule measured is the one without it
    with settings.override(batch_invariant=False):
        for shape in args.shapes.split(","):
            for precision in args.precisions.split(","):
                ratio = route_ratios(shape, precision, rows, args.runs)
                summary.append(f"| {shape} | {precision} | {crossover(rows, ratio)} |")
    print("\n| N x K | weights | crossover |")
    print("|---|---|---|")
    print("\n".join(summary))


def route_ratios(shape: str, precision: str, rows: list[int], runs: int) -> dict[int, float]:
    """Per row count, GEMM time / native time (printed as a table row)."""
    N, K = (int(v) for v in shape.split("x"))
    torch.manual_seed(0)
    n = max(2, -(-CACHE_BYTES // (N * K // 2)))
    ws = [torch.randn(N, K).bfloat16() for _ in range(n)]
    if precision != "bf16":
        ws = [quantize(w, precision) for w in ws]
    rule, bf16_rows = cpu_linear.quant_native, cpu_linear.NATIVE_MAX_ROWS_WITH_BF16
    ratio = {}
    try:
        for M in rows:
            x = torch.randn(M, K).bfloat16()
            times = {True: [], False: []}
            for _ in range(runs + 1):  # the first round warms up
                for native in (True, False):
                    cpu_linear.quant_native = lambda rows, p, native=native: native
                    cpu_linear.NATIVE_MAX_ROWS_WITH_BF16 = 1 << 30 if native else 0
                    start = time.perf_counter()
                    for w in ws:
                        cpu_linear.linear(x, w)
                    times[native].append((time.perf_counter() - start) / n)
            t_native, t_gemm = (statistics.median(times[v][1:]) * 1e6 for v in (True, False))
            ratio[M] = t_gemm / t_native
            picks = "native" if (rule(M, precision) if precision != "bf16" else M <= bf16_rows) else "GEMM"
            print(f"| {shape} | {M} | {precision} | {t_native:.0f} | {t_gemm:.0f} | {ratio[M]:.2f} | {picks} |",
                  flush=True)
    finally:
        cpu_linear.quant_native, cpu_linear.NATIVE_MAX_ROWS_WITH_BF16 = rule, bf16_rows
    return ratio


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,14336x4096", help="N x K of the weights, comma-separated")
    p.add_argument("--rows", default="1,8,64")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--force-native", action="store_true", help="the native kernels at every row count")
    p.add_argument("--routes", action="store_true", help="native against torch's GEMM (int8/int4 dequantised first)")
    p.add_argument("--precisions", default="int8,int4", help="--routes: of bf16, int8, int4")
    args = p.parse_args()
    if cpu_linear.native() is None:
        raise SystemExit("the native kernels are unavailable here (no compiler or no AVX2)")
    if args.routes:
        bad = sorted(set(args.precisions.split(",")) - {"bf16", "int8", "int4"})
        if bad:
            raise SystemExit(f"--precisions: unknown {', '.join(bad)} (valid: bf16, int8, int4)")
        return routes(args)
    if args.force_native:
        cpu_linear.bf16_instructions(False)
    print(f"threads {torch.get_num_threads()}; int8/int4 dot products: {cpu_linear.isa()}; bf16 instructions: "
          f"{cpu_linear.native_bf16()} (bf16 weights over {cpu_linear.NATIVE_MAX_ROWS_WITH_BF16} rows: "
          f"{'torch bf16 GEMM' if cpu_linear.native_bf16() else 'native'}); median of {args.runs}")
    print()
    print("| N x K | rows | weights | GB/s | GFLOP/s | speed-up over bf16 | path |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        n = max(2, -(-CACHE_BYTES // (N * K // 2)))
        weights = {"bf16": [torch.randn(N, K).bfloat16() for _ in range(n)]}
        for precision in ("int8", "int4"):
            weights[precision] = [quantize(w, precision) for w in weights["bf16"]]
        nbytes = {name: (ws[0].numel() * 2 if name == "bf16" else ws[0].nbytes()) for name, ws in weights.items()}
        if shape == args.shapes.split(",")[0]:
            stacked = torch.cat(weights["bf16"])
            t = median_time(stacked.sum, args.runs)
            print(f"(torch bf16 sum over the {shape} weights: {stacked.numel() * 2 / t / 1e9:.1f} GB/s)\n")
            del stacked
        for M in (int(m) for m in args.rows.split(",")):
            x = torch.randn(M, K).bfloat16()
            times = {}
            for name, ws in weights.items():
                times[name] = median_time(lambda: [cpu_linear.linear(x, w) for w in ws], args.runs) / n
                path = "native" if cpu_linear.supports(x, ws[0]) else "torch GEMM"
                print(f"| {N}x{K} | {M} | {name} | {nbytes[name] / times[name] / 1e9:.1f} | "
                      f"{2 * M * N * K / times[name] / 1e9:.1f} | {times['bf16'] / times[name]:.2f}x | {path} |",
                      flush=True)
        del weights


if __name__ == "__main__":
    main()
