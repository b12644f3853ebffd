"""Paged KV cache: writing new keys/values into their slots, and attention through the block
table for decode (one new token per sequence) and prefill (a sequence's new tokens over its
cached prefix; the varlen op does every prefilling sequence of a step in one call). Layout in
docs/DESIGN.md. Torch twins and Triton kernels.

k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]; slot = block * block_size + offset.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .backend import dispatch
from .native import native, takes


def _check_cache(k_cache, v_cache):
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(f"KV caches must both be [num_blocks, block_size, kv_heads, head_dim], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError("k_cache and v_cache must share strides with contiguous head_dim")


def _check_store(k, v, k_cache, v_cache, slot_mapping):
    _check_cache(k_cache, v_cache)
    if k.dim() != 3 or v.shape != k.shape or k_cache.shape[2:] != k.shape[1:] or slot_mapping.shape != k.shape[:1]:
        raise ValueError(f"store_kv: k {tuple(k.shape)}, v {tuple(v.shape)}, slots "
                         f"{tuple(slot_mapping.shape)} do not fit a cache of {tuple(k_cache.shape)}")


def _check_decode(q, k_cache, v_cache, block_tables, context_lens):
    _check_cache(k_cache, v_cache)
    if q.dim() != 3 or q.shape[1] % k_cache.shape[2] or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"paged_attention_decode: q {tuple(q.shape)} does not fit a cache of "
                         f"{tuple(k_cache.shape)} (query heads must be a multiple of KV heads)")
    B = q.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(f"paged_attention_decode: block_tables {tuple(block_tables.shape)} and "
                         f"context_lens {tuple(context_lens.shape)} must have {B} rows")


def store_kv_torch(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Write k, v [N, KV, hd] into the caches at flat slots `slot_mapping` [N] (all valid)."""
    _check_store(k, v, k_cache, v_cache, slot_mapping)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale):
    """One new query per sequence: q [B, H, hd] attends to its context_lens[b] (>= 1) cached tokens."""
    _check_decode(q, k_cache, v_cache, block_tables, context_lens)
    B, H, hd = q.shape
    if not B:
        return torch.empty_like(q)
    block_size, KV = k_cache.shape[1], k_cache.shape[2]
    # only the blocks the longest sequence uses; the rest of the table may be padding
    used = -(-int(context_lens.max()) // block_size)
    blocks = block_tables[:, :used].reshape(-1)
    L = used * block_size
    # one gather each, [B, KV, L, hd]; index_select copies whole blocks (advanced indexing is ~7x slower)
    k = k_cache.index_select(0, blocks).view(B, L, KV, hd).transpose(1, 2)
    v = v_cache.index_select(0, blocks).view(B, L, KV, hd).transpose(1, 2)
    # each KV head's group of query heads becomes its "query sequence": GQA without repeats
    qg = q.reshape(B, KV, H // KV, hd)
    mask = (torch.arange(L, device=q.device) < context_lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(qg, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)
    return out.reshape(B, H, hd)


def _check_prefill(q, k_cache, v_cache, block_table, context_len):
    _check_cache(k_cache, v_cache)
    if q.dim() != 3 or q.shape[1] % k_cache.shape[2] or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"paged_attention_prefill: q {tuple(q.shape)} does not fit a cache of "
                         f"{tuple(k_cache.shape)} (query heads must be a multiple of KV heads)")
    if block_table.dim() != 1 or not q.shape[0] <= context_len <= len(block_table) * k_cache.shape[1]:
        raise ValueError(f"paged_attention_prefill: {q.shape[0]} new tokens, context_len {context_len} and "
                         f"a block table of {tuple(block_table.shape)} blocks of {k_cache.shape[1]} do not agree")


def paged_attention_prefill_torch(q, k_cache, v_cache, block_table, context_len: int, scale):
    """The last n = q.shape[0] tokens of one sequence, q [n, H, hd], attend causally over its first
    `context_len` cached tokens (a cached prefix, then the n new ones, already stored)."""
    _check_prefill(q, k_cache, v_cache, block_table, context_len)
    n, H, hd = q.shape
    block_size, KV = k_cache.shape[1], k_cache.shape[2]
    blocks = block_table[:-(-context_len // block_size)]
    k = k_cache.index_select(0, blocks).flatten(0, 1)[:context_len].transpose(0, 1)  # [KV, L, hd]
    v = v_cache.index_select(0, blocks).flatten(0, 1)[:context_len].transpose(0, 1)
    positions = torch.arange(context_len - n, context_len, device=q.device)
    mask = torch.arange(context_len, device=q.device) <= positions[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                         scale=scale, enable_gqa=KV != H)
    return out.transpose(0, 1)


def _check_varlen(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens):
    _check_cache(k_cache, v_cache)
    name = "paged_attention_prefill_varlen"
    if q.dim() != 3 or q.shape[1] % k_cache.shape[2] or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"{name}: q {tuple(q.shape)} does not fit a cache of {tuple(k_cache.shape)} "
                         f"(query heads must be a multiple of KV heads)")
    S = context_lens.shape[0] if context_lens.dim() == 1 else -1
    if S < 0 or block_tables.dim() != 2 or block_tables.shape[0] != S or cu_seqlens_q.shape != (S + 1,):
        raise ValueError(f"{name}: block_tables {tuple(block_tables.shape)}, cu_seqlens_q "
                         f"{tuple(cu_seqlens_q.shape)} and context_lens {tuple(context_lens.shape)} must be "
                         f"[S, max_blocks], [S + 1] and [S]")
    for label, t in (("block_tables", block_tables), ("cu_seqlens_q", cu_seqlens_q), ("context_lens", context_lens)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name}: {label} must be int32, got {t.dtype}")


def _check_varlen_values(N, starts, lens, capacity):
    """Host values (free on CPU; on a GPU the Triton twin skips this rather than wait for the device)."""
    if starts[0] != 0 or starts[-1] != N or any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"paged_attention_prefill_varlen: cu_seqlens_q must rise from 0 to the {N} query "
                         f"rows, got {starts}")
    for s, L in enumerate(lens):
        if not starts[s + 1] - starts[s] <= L <= capacity:
            raise ValueError(f"paged_attention_prefill_varlen: sequence {s} has {starts[s + 1] - starts[s]} new "
                             f"tokens and context_len {L}, its block table holds {capacity} tokens")


def _gathered(cache, table, context_len):
    """[KV, L, hd]: the first `context_len` cached rows of one sequence."""
    blocks = table[:-(-context_len // cache.shape[1])]
    return cache.index_select(0, blocks).flatten(0, 1)[:context_len].transpose(0, 1)


def paged_attention_prefill_varlen_torch(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
    """Every prefilling sequence of a step in one call. q [N, H, hd] packs their new tokens:
    rows cu_seqlens_q[s]:cu_seqlens_q[s + 1] are the last ones of sequence s, which attend causally
    over its first context_lens[s] cached tokens (a cached prefix, then those new ones, already
    stored) through block_tables[s]."""
    _check_varlen(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
    starts, lens = cu_seqlens_q.tolist(), context_lens.tolist()
    _check_varlen_values(q.shape[0], starts, lens, block_tables.shape[1] * k_cache.shape[1])
    out = torch.empty_like(q)
    gqa = k_cache.shape[2] != q.shape[1]
    for s, L in enumerate(lens):
        lo, hi = starts[s], starts[s + 1]
        if lo == hi:
            continue
        k = _gathered(k_cache, block_tables[s], L).to(q.dtype)
        v = _gathered(v_cache, block_tables[s], L).to(q.dtype)
        mask = None  # nothing cached before: plain causal attention (SDPA's causal kernels)
        if L != hi - lo:
            mask = torch.arange(L, device=q.device) <= torch.arange(L - (hi - lo), L, device=q.device)[:, None]
        out[lo:hi] = F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1), k, v, attn_mask=mask, is_causal=mask is None,
                                                    scale=scale, enable_gqa=gqa).transpose(0, 1)
    return out


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     block_size, stride_block, stride_slot, stride_head, KV, HD,
                     BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    heads = tl.arange(0, BLOCK_KV)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < KV) & (cols < HD)
    src = token.to(tl.int64) * KV * HD + heads * HD + cols
    dst = (slot // block_size) * stride_block + (slot % block_size) * stride_slot + heads * stride_head + cols
    k = tl.load(k_ptr + src, mask=mask)
    v = tl.load(v_ptr + src, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(k, v, k_cache, v_cache, slot_mapping) -> None:
    _check_store(k, v, k_cache, v_cache, slot_mapping)
    N, KV, hd = k.shape
    if N:
        _store_kv_kernel[(N,)](
            k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping.contiguous(),
            k_cache.shape[1], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), KV, hd,
            BLOCK_KV=triton.next_power_of_2(KV), BLOCK_D=triton.next_power_of_2(hd))


@triton.jit
def _paged_decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
                         m_ptr, l_ptr, acc_ptr,
                         scale, max_blocks, block_size, stride_block, stride_slot, stride_head,
                         H, KV, HD, partition,
                         SPLIT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """One program per (sequence, KV head, slice of `partition` tokens): the group of H // KV
    query heads shares each K/V load. With SPLIT, each slice leaves its running max, sum and
    unnormalised output in fp32 scratch for `_paged_decode_reduce`; else it writes the output."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    group = H // KV
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < group
    d_mask = d < HD
    q_rows = (b * H + kv_head * group + g).to(tl.int64) * HD
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    q = q.to(tl.float32) * scale

    context_len = tl.load(context_lens_ptr + b)
    first = split * partition
    last = tl.minimum(context_len, first + partition)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scores
    l = tl.zeros([BLOCK_G], tl.float32)                # running sum of exp(score - m)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(first, last, BLOCK_N):
        tok = start + tl.arange(0, BLOCK_N)
        t_mask = tok < last
        block = tl.load(block_tables_ptr + b.to(tl.int64) * max_blocks + tok // block_size, mask=t_mask, other=0)
        offs = (block.to(tl.int64) * stride_block + (tok % block_size) * stride_slot
                + kv_head * stride_head)[:, None] + d[None, :]
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BLOCK_G, BLOCK_N]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    gd_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        # slices past the end keep m = -inf, l = 0: the reduction gives them weight zero
        row = ((b * KV + kv_head) * tl.num_programs(2) + split).to(tl.int64) * BLOCK_G
        tl.store(m_ptr + row + g, m)
        tl.store(l_ptr + row + g, l)
        tl.store(acc_ptr + (row + g)[:, None] * HD + d[None, :], acc, mask=gd_mask)
    else:
        tl.store(out_ptr + q_rows[:, None] + d[None, :], (acc / l[:, None]).to(out_ptr.dtype.element_ty),
                 mask=gd_mask)


@triton.jit
def _paged_decode_reduce(m_ptr, l_ptr, acc_ptr, out_ptr, splits, H, KV, HD,
                         BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the slices of one (sequence, KV head): rescale each to the common max and sum."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    group = H // KV
    s = tl.arange(0, BLOCK_S)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    base = (b * KV + kv_head).to(tl.int64) * splits * BLOCK_G
    m = tl.load(m_ptr + base + s[:, None] * BLOCK_G + g[None, :], mask=(s < splits)[:, None], other=float("-inf"))
    m_all = tl.max(m, axis=0)  # [BLOCK_G]; slice 0 always holds tokens, so this is finite
    l_all = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for i in range(0, splits):
        row = base + i * BLOCK_G + g
        w = tl.exp(tl.load(m_ptr + row) - m_all)
        l_all += w * tl.load(l_ptr + row)
        acc += w[:, None] * tl.load(acc_ptr + row[:, None] * HD + d[None, :], mask=(d < HD)[None, :], other=0.0)
    q_rows = (b * H + kv_head * group + g).to(tl.int64) * HD
    tl.store(out_ptr + q_rows[:, None] + d[None, :], (acc / l_all[:, None]).to(out_ptr.dtype.element_ty),
             mask=(g < group)[:, None] & (d < HD)[None, :])


def _tile_tokens(block_g: int, block_d: int) -> int:
    # keep the [G, N, D] fp32 product near 8K elements: registers, not local memory, on a GPU
    return max(1, min(64, 8192 // (block_g * block_d)))


# Split the context of each (sequence, KV head) into slices of at least MIN_PARTITION tokens
# until about TARGET_PROGRAMS programs run: a few sequences with long contexts fill the GPU too.
TARGET_PROGRAMS = 256
MIN_PARTITION = 256


def _decode_slices(programs: int, max_tokens: int, block_n: int) -> tuple[int, int]:
    """(slices, tokens per slice), a multiple of block_n; from the block table's width, so no sync."""
    want = max(1, min(TARGET_PROGRAMS // programs, triton.cdiv(max_tokens, MIN_PARTITION)))
    partition = triton.cdiv(triton.cdiv(max_tokens, want), block_n) * block_n
    return triton.cdiv(max_tokens, partition), partition


def paged_attention_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale):
    _check_decode(q, k_cache, v_cache, block_tables, context_lens)
    B, H, hd = q.shape
    KV = k_cache.shape[2]
    q = q.contiguous()
    out = torch.empty_like(q)
    if not B:
        return out
    block_g, block_d = triton.next_power_of_2(H // KV), triton.next_power_of_2(hd)
    block_n = min(_tile_tokens(block_g, block_d), triton.next_power_of_2(MIN_PARTITION))
    slices, partition = _decode_slices(B * KV, block_tables.shape[1] * k_cache.shape[1], block_n)
    m = l = acc = out  # unused unless split
    if slices > 1:
        m = torch.empty(B, KV, slices, block_g, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty(B, KV, slices, block_g, hd, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(B, KV, slices)](
        q, k_cache, v_cache, block_tables.contiguous(), context_lens.contiguous(), out, m, l, acc,
        scale, block_tables.shape[1], k_cache.shape[1],
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), H, KV, hd, partition,
        SPLIT=slices > 1, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d)
    if slices > 1:
        _paged_decode_reduce[(B, KV)](m, l, acc, out, slices, H, KV, hd,
                                      BLOCK_S=triton.next_power_of_2(slices), BLOCK_G=block_g, BLOCK_D=block_d)
    return out


@triton.jit
def _paged_prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, out_ptr,
                          scale, n, context_len, block_size, stride_block, stride_slot, stride_head,
                          H, KV, HD,
                          FAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """One program per (tile of BLOCK_M new tokens, query head): flash attention over the cached
    tokens through the block table, causal from the first new token's position on. FAST_DOT
    (GPU, 16-bit inputs) feeds tensor cores 16-bit operands; otherwise dots run in exact fp32."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // (H // KV)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_mask = rows < n
    d_mask = d < HD
    q_offs = (rows.to(tl.int64) * H + head)[:, None] * HD + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if not FAST_DOT:
        q = q.to(tl.float32)
    # rows past n get positions past the context: they see every key and stay finite, unstored
    pos = context_len - n + rows

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(context_len, context_len - n + (tile + 1) * BLOCK_M)
    for start in range(0, end, BLOCK_N):
        tok = start + tl.arange(0, BLOCK_N)
        t_mask = tok < context_len
        block = tl.load(block_table_ptr + tok // block_size, mask=t_mask, other=0)
        offs = (block.to(tl.int64) * stride_block + (tok % block_size) * stride_slot
                + kv_head * stride_head)[:, None] + d[None, :]
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0)
        if FAST_DOT:
            s = tl.dot(q, tl.trans(k))
        else:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        s = tl.where((tok[None, :] <= pos[:, None]) & t_mask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        if FAST_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        m = m_new
    tl.store(out_ptr + q_offs, (acc / l[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])


def _prefill_rows(fast_dot: bool) -> int:
    # exact fp32 dots keep twice the registers per element: halve the query tile
    return 64 if fast_dot else 32


def paged_attention_prefill_triton(q, k_cache, v_cache, block_table, context_len: int, scale):
    _check_prefill(q, k_cache, v_cache, block_table, context_len)
    n, H, hd = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    if n:
        fast = q.is_cuda and q.dtype != torch.float32
        block_m = min(_prefill_rows(fast), max(16, triton.next_power_of_2(n)))
        _paged_prefill_kernel[(triton.cdiv(n, block_m), H)](
            q, k_cache, v_cache, block_table.contiguous(), out,
            scale, n, context_len, k_cache.shape[1], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            H, k_cache.shape[2], hd,
            FAST_DOT=fast, BLOCK_M=block_m, BLOCK_N=32, BLOCK_D=max(16, triton.next_power_of_2(hd)))
    return out


@triton.jit
def _paged_prefill_varlen_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_ptr,
                                 context_lens_ptr, out_ptr,
                                 scale, num_seqs, max_blocks, block_size, stride_block, stride_slot, stride_head,
                                 H, KV, HD,
                                 FAST_DOT: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (tile of BLOCK_Q new tokens of one sequence, KV head): the tile's tokens
    times the BLOCK_G query heads of that KV head are the rows of one flash-attention tile, so
    each K/V tile is loaded once for the whole group. Causal from the sequence's first new token."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    # Sequence s owns the tiles from cu_seqlens[s] // BLOCK_Q + s on: room for all its tiles
    # with no host-side lengths (a few spare tiles do nothing). Binary search for this tile's.
    lo = tl.zeros([], tl.int32)
    hi = tl.zeros([], tl.int32) + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid
        else:
            hi = mid
    q_start = tl.load(cu_seqlens_ptr + lo)
    n = tl.load(cu_seqlens_ptr + lo + 1) - q_start
    first = (tile - q_start // BLOCK_Q - lo) * BLOCK_Q  # this tile's first new token in the sequence
    if first < n:
        context_len = tl.load(context_lens_ptr + lo)
        group = H // KV
        r = tl.arange(0, BLOCK_Q * BLOCK_G)
        tok = first + r // BLOCK_G
        g = r % BLOCK_G
        d = tl.arange(0, BLOCK_D)
        row_mask = (tok < n) & (g < group)
        d_mask = d < HD
        q_offs = ((q_start + tok).to(tl.int64) * H + kv_head * group + g)[:, None] * HD + d[None, :]
        q = tl.load(q_ptr + q_offs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        if not FAST_DOT:
            q = q.to(tl.float32)
        # rows past n get positions past the context: they see every key and stay finite, unstored
        pos = context_len - n + tok
        table = block_tables_ptr + lo.to(tl.int64) * max_blocks

        m = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_Q * BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], tl.float32)
        end = tl.minimum(context_len, context_len - n + first + BLOCK_Q)
        for start in range(0, end, BLOCK_N):
            key = start + tl.arange(0, BLOCK_N)
            k_mask = key < context_len
            block = tl.load(table + key // block_size, mask=k_mask, other=0)
            offs = (block.to(tl.int64) * stride_block + (key % block_size) * stride_slot
                    + kv_head * stride_head)[:, None] + d[None, :]
            kv_mask = k_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0)
            if FAST_DOT:
                s = tl.dot(q, tl.trans(k))
            else:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            s = tl.where((key[None, :] <= pos[:, None]) & k_mask[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            if FAST_DOT:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            else:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            m = m_new
        tl.store(out_ptr + q_offs, (acc / l[:, None]).to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & d_mask[None, :])


def _varlen_tile(group: int, fast_dot: bool, tokens: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_G): about _prefill_rows rows of tokens x grouped heads, at least 16 (tl.dot)."""
    block_g = triton.next_power_of_2(group)
    block_q = min(max(1, _prefill_rows(fast_dot) // block_g), triton.next_power_of_2(max(tokens, 1)))
    return max(block_q, 16 // block_g, 1), block_g


def paged_attention_prefill_varlen_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
    _check_varlen(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
    N, H, hd = q.shape
    S, KV = context_lens.shape[0], k_cache.shape[2]
    if not q.is_cuda:  # the values are on the host anyway (the interpreter)
        _check_varlen_values(N, cu_seqlens_q.tolist(), context_lens.tolist(), block_tables.shape[1] * k_cache.shape[1])
    q = q.contiguous()
    out = torch.empty_like(q)
    if N and S:
        fast = q.is_cuda and q.dtype != torch.float32
        block_q, block_g = _varlen_tile(H // KV, fast, N)
        _paged_prefill_varlen_kernel[(N // block_q + S, KV)](
            q, k_cache, v_cache, block_tables.contiguous(), cu_seqlens_q.contiguous(), context_lens.contiguous(), out,
            scale, S, block_tables.shape[1], k_cache.shape[1], k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), H, KV, hd,
            FAST_DOT=fast, BLOCK_Q=block_q, BLOCK_G=block_g, BLOCK_N=32, BLOCK_D=max(16, triton.next_power_of_2(hd)))
    return out


def _rows(t: torch.Tensor) -> bool:
    """[N, heads, hd] with packed heads; rows may be strided (views into a fused projection)."""
    return t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]


def store_kv_native(k, v, k_cache, v_cache, slot_mapping):
    if (not takes(k, v, k_cache, v_cache) or not (_rows(k) and _rows(v)) or slot_mapping.dtype != torch.int64
            or not (k_cache.is_contiguous() and v_cache.is_contiguous())):
        return NotImplemented
    _check_store(k, v, k_cache, v_cache, slot_mapping)
    slots = slot_mapping.contiguous()
    native().store_kv_bf16(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(),
                           v_cache.data_ptr(), slots.data_ptr(), k.shape[0], k.shape[1] * k.shape[2])


def paged_attention_decode_native(q, k_cache, v_cache, block_tables, context_lens, scale):
    if (not takes(q, k_cache, v_cache) or not _rows(q) or q.shape[2] % 8 or q.shape[2] > 256  # see MAX_HD
            or block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32
            or not (k_cache.is_contiguous() and v_cache.is_contiguous())):
        return NotImplemented
    _check_decode(q, k_cache, v_cache, block_tables, context_lens)
    B, H, hd = q.shape
    tables, lens = block_tables.contiguous(), context_lens.contiguous()
    out = torch.empty(B, H, hd, dtype=q.dtype)
    native().paged_decode_bf16(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                               tables.shape[1], lens.data_ptr(), B, H, k_cache.shape[2], hd, k_cache.shape[1],
                               scale, out.data_ptr(), torch.get_num_threads())
    return out


store_kv = dispatch(store_kv_torch, store_kv_triton, store_kv_native)
paged_attention_decode = dispatch(paged_attention_decode_torch, paged_attention_decode_triton,
                                  paged_attention_decode_native)
paged_attention_prefill = dispatch(paged_attention_prefill_torch, paged_attention_prefill_triton)
paged_attention_prefill_varlen = dispatch(paged_attention_prefill_varlen_torch, paged_attention_prefill_varlen_triton)


def _aot_store(dtype: str, kv_heads: int, head_dim: int):
    sig = {"k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}",
           "slot_ptr": "*i64", "block_size": "i32", "stride_block": "i32", "stride_slot": "i32",
           "stride_head": "i32", "KV": "i32", "HD": "i32", "BLOCK_KV": "constexpr", "BLOCK_D": "constexpr"}
    return (f"store_kv_{dtype}_kv{kv_heads}_d{head_dim}", _store_kv_kernel, sig,
            {"BLOCK_KV": kv_heads, "BLOCK_D": head_dim})


def _aot_decode(dtype: str, group: int, head_dim: int, split: bool):
    sig = {"q_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}",
           "block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "out_ptr": f"*{dtype}",
           "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32",
           "scale": "fp32", "max_blocks": "i32", "block_size": "i32", "stride_block": "i32",
           "stride_slot": "i32", "stride_head": "i32", "H": "i32", "KV": "i32", "HD": "i32", "partition": "i32",
           "SPLIT": "constexpr", "BLOCK_G": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
    return (f"paged_attention_decode{'_split' if split else ''}_{dtype}_g{group}_d{head_dim}", _paged_decode_kernel,
            sig, {"SPLIT": split, "BLOCK_G": group, "BLOCK_N": _tile_tokens(group, head_dim), "BLOCK_D": head_dim})


def _aot_reduce(dtype: str, group: int, head_dim: int):
    sig = {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": f"*{dtype}",
           "splits": "i32", "H": "i32", "KV": "i32", "HD": "i32",
           "BLOCK_S": "constexpr", "BLOCK_G": "constexpr", "BLOCK_D": "constexpr"}
    return (f"paged_attention_reduce_{dtype}_g{group}_d{head_dim}", _paged_decode_reduce, sig,
            {"BLOCK_S": 64, "BLOCK_G": group, "BLOCK_D": head_dim})


def _aot_prefill(dtype: str, head_dim: int, fast: bool):
    sig = {"q_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}",
           "block_table_ptr": "*i32", "out_ptr": f"*{dtype}", "scale": "fp32", "n": "i32",
           "context_len": "i32", "block_size": "i32", "stride_block": "i32", "stride_slot": "i32",
           "stride_head": "i32", "H": "i32", "KV": "i32", "HD": "i32",
           "FAST_DOT": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
    return (f"paged_attention_prefill_{dtype}_d{head_dim}", _paged_prefill_kernel, sig,
            {"FAST_DOT": fast, "BLOCK_M": _prefill_rows(fast), "BLOCK_N": 32, "BLOCK_D": head_dim})


def _aot_prefill_varlen(dtype: str, group: int, head_dim: int, fast: bool):
    sig = {"q_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}",
           "block_tables_ptr": "*i32", "cu_seqlens_ptr": "*i32", "context_lens_ptr": "*i32", "out_ptr": f"*{dtype}",
           "scale": "fp32", "num_seqs": "i32", "max_blocks": "i32", "block_size": "i32", "stride_block": "i32",
           "stride_slot": "i32", "stride_head": "i32", "H": "i32", "KV": "i32", "HD": "i32",
           "FAST_DOT": "constexpr", "BLOCK_Q": "constexpr", "BLOCK_G": "constexpr", "BLOCK_N": "constexpr",
           "BLOCK_D": "constexpr"}
    block_q, block_g = _varlen_tile(group, fast, 1 << 20)
    return (f"paged_attention_prefill_varlen_{dtype}_g{group}_d{head_dim}", _paged_prefill_varlen_kernel, sig,
            {"FAST_DOT": fast, "BLOCK_Q": block_q, "BLOCK_G": block_g, "BLOCK_N": 32, "BLOCK_D": head_dim})


AOT_KERNELS = ([_aot_store(dtype, 8, 128) for dtype in ("bf16", "fp16", "fp32")]
               + [_aot_decode(dtype, group, 128, split) for dtype in ("bf16", "fp16", "fp32")
                  for group, split in ((1, False), (4, False), (4, True), (8, True))]
               + [_aot_reduce(dtype, 4, 128) for dtype in ("bf16", "fp16", "fp32")]
               + [_aot_prefill(dtype, 128, dtype != "fp32") for dtype in ("bf16", "fp16", "fp32")]
               + [_aot_prefill_varlen(dtype, group, 128, dtype != "fp32") for dtype in ("bf16", "fp16", "fp32")
                  for group in (1, 4, 8)])
