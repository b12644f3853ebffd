"""Paged-attention decode on CPU (the torch twin the engine runs): time per call, the K/V bytes
one decode step must read, achieved GB/s, and the machine's copy bandwidth measured in the same
run (the physical limit), with the ratio to a per-sequence-loop baseline.

    python bench/attention.py [--dtype bfloat16] [--repeat 10] [--threads N]
"""
import argparse
import time

import torch
import torch.nn.functional as F

from tinymoe.kernels.attention import paged_attention_decode_torch

H, KV, HD, BLOCK = 32, 8, 128, 16  # Mixtral-8x7B attention


def per_sequence_baseline(q, k_cache, v_cache, block_tables, context_lens, scale):
    """What one writes first: each sequence's blocks gathered and attended on their own."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        blocks = block_tables[b, :-(-n // BLOCK)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].transpose(0, 1)
        v = v_cache[blocks].flatten(0, 1)[:n].transpose(0, 1)
        out[b] = F.scaled_dot_product_attention(q[b][:, None], k, v, scale=scale, enable_gqa=True)[:, 0]
    return out


def timed(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def copy_bandwidth(repeat: int) -> float:
    src = torch.randn(64 * 2**20 // 4)  # 64 MiB: far beyond the caches
    dst = torch.empty_like(src)
    return 2 * src.nbytes / timed(lambda: dst.copy_(src), repeat)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    limit = copy_bandwidth(args.repeat)
    print(f"copy bandwidth {limit / 1e9:.1f} GB/s, {torch.get_num_threads()} threads, {args.dtype}, "
          f"H={H} KV={KV} head_dim={HD} block={BLOCK}")
    print(f"{'batch':>5} {'context':>7} {'KV MB':>7} {'ms':>8} {'GB/s':>6} {'of copy':>7} {'baseline ms':>11} {'speed-up':>8}")
    for batch, context in ((1, 2048), (8, 512), (8, 2048), (32, 512)):
        per_seq = context // BLOCK + 1
        k_cache = torch.randn(batch * per_seq, BLOCK, KV, HD, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(batch * per_seq).view(batch, per_seq).int()
        lens = torch.full((batch,), context, dtype=torch.int32)
        q = torch.randn(batch, H, HD, dtype=dtype)
        call = (q, k_cache, v_cache, tables, lens, HD ** -0.5)
        ours = timed(lambda: paged_attention_decode_torch(*call), args.repeat)
        base = timed(lambda: per_sequence_baseline(*call), args.repeat)
        kv_bytes = 2 * batch * context * KV * HD * k_cache.element_size()
        print(f"{batch:>5} {context:>7} {kv_bytes / 1e6:>7.1f} {ours * 1e3:>8.2f} {kv_bytes / ours / 1e9:>6.1f} "
              f"{kv_bytes / ours / limit:>7.0%} {base * 1e3:>11.2f} {base / ours:>7.2f}x")


if __name__ == "__main__":
    main()
