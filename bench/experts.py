"""Time of one Mixtral-8x7B MoE layer's experts (hidden 4096, intermediate 14336, 8 experts,
top-2) on the torch CPU path, with bf16, int8 and int4 expert weights, at batch 1, 8 and 64.

    python bench/experts.py [--batches 1,8,64] [--precisions full,int8,int4] [--runs 5]
                            [--hidden 4096 --inter 14336 --experts 8 --top-k 2]

Per cell: the median layer time over --runs (after a warm-up), the expert weight bytes the
step reads (every copy that gets at least one token, scales and zeros included), the achieved
GB/s, and its share of the machine's copy bandwidth (the physical limit of a bandwidth-bound
step; STREAM convention: bytes read + bytes written). The CPU is shared with other work, so the
copy bandwidth is measured between the layer's runs, cell by cell (median), and each share is
against its own cell's figure. The baseline rows are the seed implementation (separate gate,
up, down matmuls per expert, as transformers does), same weights, same process.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tinymoe.experts import Copy, ExpertPlan, Experts


class CopyBandwidth:
    """Bytes/s of copying a buffer far larger than the caches (read + write counted)."""

    def __init__(self, gib: float = 0.5):
        self.src = torch.ones(int(gib * 2**30), dtype=torch.uint8)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)

    def __call__(self) -> float:
        t = time.perf_counter()
        self.dst.copy_(self.src)
        return 2 * self.src.numel() / (time.perf_counter() - t)


def read_bandwidth(gib: float = 0.5, trials: int = 5) -> float:
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def seed_forward(ex: Experts, x, ids, weights):
    """The baseline: a loop over experts with three separate matmuls each."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=ex.num_experts).tolist()
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n:
            rows = order[start:start + n] // k
            xe = x[rows]
            h = F.silu(F.linear(xe, ex.w_gate[e])) * F.linear(xe, ex.w_up[e])
            y = F.linear(h, ex.w_down[e]) * weights.reshape(-1)[order[start:start + n], None]
            out.index_add_(0, rows, y)
            start += n
    return out


def measure(fn, runs: int, copy: CopyBandwidth) -> tuple[float, float]:
    """(median time of fn, median copy bandwidth), the two measured alternately."""
    fn()
    times, bandwidths = [], []
    for _ in range(runs):
        bandwidths.append(copy())
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), statistics.median(bandwidths)


def routing(batch: int, experts: int, top_k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(batch)])
    weights = torch.rand(batch, top_k, generator=g)
    return ids, (weights / weights.sum(1, keepdim=True)).bfloat16()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--precisions", default="full,int8,int4")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--no-baseline", action="store_true")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    E, I, D = args.experts, args.inter, args.hidden

    torch.manual_seed(0)
    ex = Experts(torch.randn(E, I, D, dtype=torch.bfloat16) * 0.02, torch.randn(E, I, D, dtype=torch.bfloat16) * 0.02,
                 torch.randn(E, D, I, dtype=torch.bfloat16) * 0.02)
    copy = CopyBandwidth()
    print(f"threads {torch.get_num_threads()}; at start: copy bandwidth {copy() / 1e9:.1f} GB/s "
          f"(read + write), read bandwidth {read_bandwidth() / 1e9:.1f} GB/s\n")
    print("| experts | batch | active experts | bytes read / step | layer time | GB/s | copy BW (same cell) | share |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for precision in args.precisions.split(","):
        ex.apply_plan(ExpertPlan([Copy(e, precision) for e in range(E)]))
        per_copy = ex.weight_bytes() / E
        cases = [("tinymoe", ex)] + ([("seed loop", None)] if precision == "full" and not args.no_baseline else [])
        for name, _ in cases:
            for batch in batches:
                ids, w = routing(batch, E, args.top_k, seed=batch)
                x = torch.randn(batch, D, dtype=torch.bfloat16)
                if name == "tinymoe":
                    fn = lambda: ex(x, ids, w)  # noqa: E731
                else:
                    fn = lambda: seed_forward(ex, x, ids, w)  # noqa: E731
                with torch.inference_mode():
                    t, copy_bw = measure(fn, args.runs, copy)
                active = int(ids.unique().numel())
                nbytes = active * per_copy
                label = {"full": "bf16", "int8": "int8", "int4": "int4"}[precision]
                label = label if name == "tinymoe" else "bf16 (seed loop, baseline)"
                print(f"| {label} | {batch} | {active} | {nbytes / 1e6:.0f} MB | {t * 1e3:.1f} ms | "
                      f"{nbytes / t / 1e9:.1f} | {copy_bw / 1e9:.1f} | {nbytes / t / copy_bw:.2f} |", flush=True)
                rows.append((label, batch, t))
    base = {b: t for label, b, t in rows if "baseline" in label}
    if base:
        print("\nspeed-up over the seed loop: " + ", ".join(
            f"{label} b{b} {base[b] / t:.2f}x" for label, b, t in rows if "baseline" not in label and b in base))


if __name__ == "__main__":
    main()
