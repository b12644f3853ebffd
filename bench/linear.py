"""The native CPU matmul (`tinymoe.kernels.linear`) against torch's, in the same process.

    python bench/linear.py [--rows 1,2,8,32] [--shape 7168x1024] [--matrices 16] [--runs 10]

Per row count: the median time of one x [M, K] @ w[N, K].T over --matrices different weights
(more bytes than the caches hold), as GB/s of weights streamed and GFLOP/s, for bf16 weights
(torch: `torch.mv` for one row, else `F.linear` in bf16) and int8 weights with per-row scales
(torch: `_weight_int8pack_mm`); first, for scale, torch's plain `sum` over the same weights in
bf16 and fp32. Pause other work on the machine first: with two threads on two
vCPUs, any other busy process slows OpenMP kernels many times over.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tinymoe.experts.quant import quantize_int8
from tinymoe.kernels import cpu_linear


def median_time(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2,8,32")
    p.add_argument("--shape", default="7168x1024", help="N x K of each weight")
    p.add_argument("--matrices", type=int, default=16)
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()
    if cpu_linear.native() is None:
        raise SystemExit("the native kernel is unavailable here (no compiler or no AVX2)")
    N, K = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    weights = [torch.randn(N, K).bfloat16() for _ in range(args.matrices)]
    quantised = [quantize_int8(w) for w in weights]
    print(f"threads {torch.get_num_threads()}, weights {args.matrices} x [{N}, {K}], median of {args.runs}")
    # what plain streaming reaches here, for scale: torch's sum over all the weights
    stacked = torch.cat(weights)
    for dtype in (torch.bfloat16, torch.float32):
        data = stacked.to(dtype)
        t = median_time(data.sum, args.runs)
        print(f"torch {str(dtype)[6:]} sum over them: {data.numel() * data.element_size() / t / 1e9:.1f} GB/s")
    del stacked, data
    print()
    print("| weights | rows | torch GB/s | tinymoe GB/s | torch GFLOP/s | tinymoe GFLOP/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for M in (int(m) for m in args.rows.split(",")):
        x = torch.randn(M, K).bfloat16()
        cases = {
            "bf16": ((lambda w: torch.mv(w, x[0])) if M == 1 else (lambda w: F.linear(x, w)),
                     lambda w: cpu_linear.linear(x, w), weights, 2),
            "int8": (lambda qs: torch.ops.aten._weight_int8pack_mm(x, *qs),
                     lambda qs: cpu_linear.linear(x, *qs), quantised, 1),
        }
        for name, (ours_torch, ours, ws, elem) in cases.items():
            t_torch = median_time(lambda: [ours_torch(w) for w in ws], args.runs) / len(ws)
            t_ours = median_time(lambda: [ours(w) for w in ws], args.runs) / len(ws)
            gb, gf = N * K * elem / 1e9, 2 * M * N * K / 1e9
            print(f"| {name} | {M} | {gb / t_torch:.1f} | {gb / t_ours:.1f} | {gf / t_torch:.1f} | "
                  f"{gf / t_ours:.1f} | {t_torch / t_ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
