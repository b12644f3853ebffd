"""Paged KV cache: writing new keys/values into their slots, and attention through the block
table for decode (one new token per sequence) and prefill (a sequence's new tokens over its
cached prefix; the varlen op does every prefilling sequence of a step in one call). Layout in
docs/DESIGN.md. Torch twins and native CPU ops; the Triton kernels are in attention_triton.py.

k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]; slot = block * block_size + offset.
"""
import torch
import torch.nn.functional as F

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


def native_head_dim(hd: int) -> bool:
    """Does the native paged decode attention take this head size (cpu_ops.cpp's MAX_HD)?"""
    return hd % 8 == 0 and hd <= 256


def paged_attention_decode_native(q, k_cache, v_cache, block_tables, context_lens, scale):
    if (not takes(q, k_cache, v_cache) or not _rows(q) or not native_head_dim(q.shape[2])
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


store_kv = dispatch(store_kv_torch, "attention_triton:store_kv_triton", store_kv_native)
paged_attention_decode = dispatch(paged_attention_decode_torch, "attention_triton:paged_attention_decode_triton",
                                  paged_attention_decode_native)
paged_attention_prefill = dispatch(paged_attention_prefill_torch, "attention_triton:paged_attention_prefill_triton")
paged_attention_prefill_varlen = dispatch(paged_attention_prefill_varlen_torch,
                                          "attention_triton:paged_attention_prefill_varlen_triton")
