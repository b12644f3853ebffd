"""The paged-KV Triton kernels and their launchers (store_kv, decode with split slices, prefill,
varlen prefill); the ops, their torch twins and checks are in attention.py."""
import torch
import triton
import triton.language as tl

from .attention import _check_decode, _check_prefill, _check_store, _check_varlen, _check_varlen_values


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
def _paged_flash_rows(q, pos, table_ptr, k_cache_ptr, v_cache_ptr, kv_head, d, d_mask, scale, context_len, end,
                      block_size, stride_block, stride_slot, stride_head,
                      FAST_DOT: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Flash attention of the ROWS query rows `q` (at positions `pos`) over cached keys [0, end)
    of one KV head through a sequence's block table; returns the normalised [ROWS, BLOCK_D] fp32
    output. FAST_DOT (GPU, 16-bit inputs) feeds tensor cores 16-bit operands; else exact fp32."""
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for start in range(0, end, BLOCK_N):
        key = start + tl.arange(0, BLOCK_N)
        k_mask = key < context_len
        block = tl.load(table_ptr + key // block_size, mask=k_mask, other=0)
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
    return acc / l[:, None]


@triton.jit
def _paged_prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, out_ptr,
                          scale, n, context_len, block_size, stride_block, stride_slot, stride_head,
                          H, KV, HD,
                          FAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """One program per (tile of BLOCK_M new tokens, query head): flash attention over the cached
    tokens through the block table, causal from the first new token's position on."""
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

    end = tl.minimum(context_len, context_len - n + (tile + 1) * BLOCK_M)
    out = _paged_flash_rows(q, pos, block_table_ptr, k_cache_ptr, v_cache_ptr, kv_head, d, d_mask, scale,
                            context_len, end, block_size, stride_block, stride_slot, stride_head,
                            FAST_DOT, BLOCK_M, BLOCK_N, BLOCK_D)
    tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


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

        end = tl.minimum(context_len, context_len - n + first + BLOCK_Q)
        out = _paged_flash_rows(q, pos, table, k_cache_ptr, v_cache_ptr, kv_head, d, d_mask, scale,
                                context_len, end, block_size, stride_block, stride_slot, stride_head,
                                FAST_DOT, BLOCK_Q * BLOCK_G, BLOCK_N, BLOCK_D)
        tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


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
