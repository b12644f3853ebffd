"""bf16 against int8 and int4 weights in `tinymoe.kernels.linear`, in the same process.

    python bench/linear.py [--shapes 4096x4096,14336x4096] [--rows 1,8,64] [--runs 5] [--force-native]
    python bench/linear.py --routes [--shapes 7168x1024,1024x3584,1536x1024] [--rows 32,128,512]

Per weight shape N x K and row count M: the median time of one x [M, K] @ w[N, K].T over enough
different weights that they do not fit in the caches, as GB/s of weight bytes read (int8 / int4:
codes and scales, `QWeight.nbytes`) and GFLOP/s, and each precision's speed-up over bf16 in the
same run. First the machine's paths: which integer dot products the library was built with
(`cpu_linear.isa()`, Settings.native_isa), whether the CPU counts as having bf16 instructions (then
more than 16 rows go to torch's bf16 GEMM, int8/int4 as `cpu_linear.quant_native` decides, unless
--force-native), and, for scale, torch's plain `sum` over bf16 weights. Pause other work on the
machine first: with two threads on two vCPUs, any other busy process slows OpenMP kernels many
times over.

--routes: for int8 and int4 weights, each row count through both routes of a QWeight matmul, forced
(the native kernel; the weight dequantised to bf16 and torch's GEMM), rounds alternating, and which
one `quant_native` picks: the measurement behind cpu_linear.QUANT_NATIVE_MAX_ROWS.
"""
import argparse
import statistics
import time

import torch

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


def routes(args):
    print(f"threads {torch.get_num_threads()}; int8/int4 dot products: {cpu_linear.isa()}; bf16 instructions: "
          f"{cpu_linear.native_bf16()}; median of {args.runs} alternating rounds\n")
    print("| N x K | rows | weights | native ms | dequantise + GEMM ms | GEMM / native | rule picks |")
    print("|---|---|---|---|---|---|---|")
    rule = cpu_linear.quant_native
    try:
        for shape in args.shapes.split(","):
            N, K = (int(v) for v in shape.split("x"))
            torch.manual_seed(0)
            w = torch.randn(N, K).bfloat16()
            for precision in ("int8", "int4"):
                qw = quantize(w, precision)
                for M in (int(m) for m in args.rows.split(",")):
                    x = torch.randn(M, K).bfloat16()
                    times = {True: [], False: []}
                    for _ in range(args.runs + 1):  # the first round warms up
                        for native in (True, False):
                            cpu_linear.quant_native = lambda rows, p, native=native: native
                            start = time.perf_counter()
                            cpu_linear.linear(x, qw)
                            times[native].append(time.perf_counter() - start)
                    t_native, t_gemm = (statistics.median(times[n][1:]) * 1e3 for n in (True, False))
                    picks = "native" if rule(M, precision) else "GEMM"
                    print(f"| {shape} | {M} | {precision} | {t_native:.2f} | {t_gemm:.2f} | {t_gemm / t_native:.2f} | "
                          f"{picks} |", flush=True)
    finally:
        cpu_linear.quant_native = rule


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,14336x4096", help="N x K of the weights, comma-separated")
    p.add_argument("--rows", default="1,8,64")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--force-native", action="store_true", help="the native kernels at every row count")
    p.add_argument("--routes", action="store_true", help="int8/int4: native against dequantise + GEMM")
    args = p.parse_args()
    if cpu_linear.native() is None:
        raise SystemExit("the native kernels are unavailable here (no compiler or no AVX2)")
    if args.routes:
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
