"""RMSNorm, rotary, store_kv, paged-attention decode, prefill and varlen prefill: each Triton kernel (run by Triton's
interpreter on CPU) and each torch twin against a float64 reference on fresh random inputs.
Every torch.empty/empty_like is NaN-poisoned while an op runs, so a row it forgets fails."""
import math

import pytest
import torch

from tinymoe import kernels, settings
from tinymoe.kernels import backend

IMPLS = ["triton", "torch"]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def interpreter():
    if not backend.interpreting():
        pytest.fail("Triton's interpreter is off in this process: triton was imported before "
                    "TRITON_INTERPRET=1 was set (set it in the environment or tests/conftest.py)")


@pytest.fixture
def poisoned(monkeypatch):
    """Fresh tensors from torch.empty / empty_like come filled with NaN (or -1 for integers)."""
    def poison(make):
        def made(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan") if t.is_floating_point() else -1)
        return made
    monkeypatch.setattr(torch, "empty", poison(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poison(torch.empty_like))


def run(impl, op, *args):
    with kernels.use_backend(impl):
        return op(*args)


def assert_close(out, ref, roundings, atol=1e-6):
    """fp32: tight. bf16: one bf16 ulp (at most 2^-7 of the value) per rounding the op makes."""
    assert out.shape == ref.shape and not out.isnan().any()
    out, ref = out.double(), ref.double()
    err = (out - ref).abs()
    if roundings is None:
        tol = 1e-5 * (1 + ref.abs())
    else:
        tol = roundings * 2.0 ** -7 * ref.abs() + atol
    worst = (err - tol).argmax()
    assert (err <= tol).all(), f"out {out.flatten()[worst]:.6g} vs ref {ref.flatten()[worst]:.6g}"


def bf16_ulps(dtype, n):
    return n if dtype == torch.bfloat16 else None


# ---------------------------------------------------------------------------------- rms_norm

def rms_norm_ref(x, w, eps, residual=None):
    s = x.double() + (residual.double() if residual is not None else 0)
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    return y, s


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 48), (3, 5, 40)])
def test_rms_norm(impl, dtype, shape, poisoned):
    x, w = torch.randn(shape, dtype=dtype), torch.randn(shape[-1]).to(dtype)
    y = run(impl, kernels.rms_norm, x, w, 1e-5)
    assert y.dtype == dtype
    assert_close(y, rms_norm_ref(x, w, 1e-5)[0], bf16_ulps(dtype, 2))  # normed, then * weight


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_fused_residual(impl, dtype, poisoned):
    x, r, w = (torch.randn(7, 40, dtype=dtype), torch.randn(7, 40, dtype=dtype),
               torch.randn(40).to(dtype))
    y, new_residual = run(impl, kernels.rms_norm, x, w, 1e-6, r)
    y_ref, s_ref = rms_norm_ref(x, w, 1e-6, r)
    assert_close(new_residual, s_ref, bf16_ulps(dtype, 1))
    assert_close(y, y_ref, bf16_ulps(dtype, 3))  # the sum, the normed value, the product


# ------------------------------------------------------------------------------------ rotary

def rope_tables(positions, head_dim, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    f = positions.double()[:, None] * inv
    return f.cos().float(), f.sin().float()


def rotary_ref(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].double(), x[..., half:].double()
    c, s = cos.double()[:, None], sin.double()[:, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 3, 16), (2, 7, 6, 16)])  # [B, T, heads, hd]
def test_apply_rotary(impl, dtype, shape, poisoned):
    x = torch.randn(shape, dtype=dtype)
    cos, sin = rope_tables(torch.randint(0, 4096, (shape[1],)), shape[-1])
    out = run(impl, kernels.apply_rotary, x, cos, sin)
    assert out.dtype == dtype
    assert_close(out, rotary_ref(x, cos, sin), bf16_ulps(dtype, 1))


# ---------------------------------------------------------------------------------- store_kv

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7])
def test_store_kv(impl, dtype, tokens, poisoned):
    num_blocks, block_size, KV, hd = 5, 4, 2, 16
    k, v = torch.randn(tokens, KV, hd, dtype=dtype), torch.randn(tokens, KV, hd, dtype=dtype)
    k_cache = torch.randn(num_blocks, block_size, KV, hd, dtype=dtype)
    v_cache = torch.randn(num_blocks, block_size, KV, hd, dtype=dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    run(impl, kernels.store_kv, k, v, k_cache, v_cache, slots)
    for cache, before, new in ((k_cache, k_before, k), (v_cache, v_before, v)):
        flat, expect = cache.view(-1, KV, hd), before.view(-1, KV, hd).clone()
        expect[slots] = new
        assert torch.equal(flat, expect)  # new rows exact, every other slot untouched


# -------------------------------------------------------------------- paged attention decode

def decode_ref(q, k_cache, v_cache, block_tables, context_lens, scale):
    B, H, hd = q.shape
    KV, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty(B, H, hd, dtype=torch.float64)
    magnitude = torch.empty(B, H, hd, dtype=torch.float64)  # sum of p * |v|
    for b in range(B):
        n = int(context_lens[b])
        slots = [int(block_tables[b, t // bs]) * bs + t % bs for t in range(n)]
        k = k_cache.view(-1, KV, hd)[slots].double().repeat_interleave(H // KV, dim=1)  # [n, H, hd]
        v = v_cache.view(-1, KV, hd)[slots].double().repeat_interleave(H // KV, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double(), k) * scale, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", p, v)
        magnitude[b] = torch.einsum("hn,nhd->hd", p, v.abs())
    return out, magnitude


def paged_case(context_lens, H, KV, hd, block_size, dtype):
    """Caches where every slot no sequence owns (and every padding block) holds a huge value: read
    and not masked, it swamps the softmax or the sum. (NaN would also catch the torch twin's
    harmless 0 * NaN of masked padding; the engine keeps its caches finite.)"""
    B = len(context_lens)
    used = [-(-n // block_size) for n in context_lens]
    width = max(used) + 1  # one padding column at least
    num_blocks = sum(used) + 1
    order = torch.randperm(num_blocks - 1)  # scattered, not in sequence order
    k_cache = torch.full((num_blocks, block_size, KV, hd), 3e4, dtype=dtype)
    v_cache = torch.full_like(k_cache, 3e4)
    pad = num_blocks - 1  # a valid block id holding only poison
    tables = torch.full((B, width), pad, dtype=torch.int32)
    start = 0
    for b, n in enumerate(context_lens):
        tables[b, :used[b]] = order[start:start + used[b]].int()
        start += used[b]
        for t in range(n):
            blk, off = int(tables[b, t // block_size]), t % block_size
            k_cache[blk, off] = torch.randn(KV, hd).to(dtype)
            v_cache[blk, off] = torch.randn(KV, hd).to(dtype)
    q = torch.randn(B, H, hd, dtype=dtype)
    return q, k_cache, v_cache, tables, torch.tensor(context_lens, dtype=torch.int32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("context_lens,H,KV,hd,block_size", [
    ([1], 2, 2, 16, 4),                 # a single cached token, plain multi-head
    ([13, 1, 6], 6, 2, 16, 4),          # odd lengths over several blocks, GQA groups of 3
    ([37, 20], 8, 1, 32, 16),           # one KV head for all (MQA), more than one token tile
])
def test_paged_attention_decode(impl, dtype, context_lens, H, KV, hd, block_size, poisoned):
    q, k_cache, v_cache, tables, lens = paged_case(context_lens, H, KV, hd, block_size, dtype)
    scale = 1 / math.sqrt(hd)
    out = run(impl, kernels.paged_attention_decode, q, k_cache, v_cache, tables, lens, scale)
    assert out.dtype == dtype
    ref, magnitude = decode_ref(q, k_cache, v_cache, tables, lens, scale)
    if impl == "triton" or dtype == torch.float32:
        assert_close(out, ref, bf16_ulps(dtype, 1))  # fp32 inside, one rounding on the store
    else:
        # bf16 SDPA rounds the probabilities to bf16 before p @ v: an error relative to sum p|v|
        assert_close(out, ref, 1, atol=2.0 ** -7 * magnitude)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("context_lens,H,KV,hd,block_size", [
    ([13, 1, 6], 6, 2, 16, 4),   # the 1-token sequence leaves later slices empty
    ([37, 20], 8, 1, 32, 16),
])
def test_paged_attention_decode_split_slices(dtype, context_lens, H, KV, hd, block_size, poisoned, monkeypatch):
    """Long contexts on few sequences: slices of 4 tokens computed apart, then merged."""
    from tinymoe.kernels import attention_triton
    monkeypatch.setattr(attention_triton, "MIN_PARTITION", 4)
    q, k_cache, v_cache, tables, lens = paged_case(context_lens, H, KV, hd, block_size, dtype)
    slices, _ = attention_triton._decode_slices(len(context_lens) * KV, tables.shape[1] * block_size, 4)
    assert slices > 2
    out = run("triton", kernels.paged_attention_decode, q, k_cache, v_cache, tables, lens, 1 / math.sqrt(hd))
    ref, _ = decode_ref(q, k_cache, v_cache, tables, lens, 1 / math.sqrt(hd))
    assert_close(out, ref, bf16_ulps(dtype, 1))


def prefill_ref(q, k_cache, v_cache, table, context_len, scale):
    n, H, hd = q.shape
    KV, bs = k_cache.shape[2], k_cache.shape[1]
    slots = [int(table[t // bs]) * bs + t % bs for t in range(context_len)]
    k = k_cache.view(-1, KV, hd)[slots].double().repeat_interleave(H // KV, dim=1)  # [L, H, hd]
    v = v_cache.view(-1, KV, hd)[slots].double().repeat_interleave(H // KV, dim=1)
    s = torch.einsum("nhd,lhd->hnl", q.double(), k) * scale
    future = torch.arange(context_len) > torch.arange(context_len - n, context_len)[:, None]
    p = torch.softmax(s.masked_fill(future, float("-inf")), dim=-1)
    return torch.einsum("hnl,lhd->nhd", p, v), torch.einsum("hnl,lhd->nhd", p, v.abs())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,context_len,H,KV,hd,block_size", [
    (7, 7, 4, 2, 16, 4),        # a fresh prompt: nothing cached before it
    (5, 13, 6, 2, 16, 4),       # a cached prefix of 8 (prefix caching, chunked prefill)
    (1, 9, 2, 2, 16, 4),        # a single new token
    (70, 75, 4, 1, 16, 16),     # two query tiles, several key tiles, MQA
])
def test_paged_attention_prefill(impl, dtype, n, context_len, H, KV, hd, block_size, poisoned):
    q, k_cache, v_cache, tables, _ = paged_case([context_len], H, KV, hd, block_size, dtype)
    q = torch.randn(n, H, hd, dtype=dtype)
    table = tables[0, :-(-context_len // block_size)].long()
    out = run(impl, kernels.paged_attention_prefill, q, k_cache, v_cache, table, context_len, hd ** -0.5)
    assert out.dtype == dtype
    ref, magnitude = prefill_ref(q, k_cache, v_cache, table, context_len, hd ** -0.5)
    if impl == "triton" or dtype == torch.float32:
        assert_close(out, ref, bf16_ulps(dtype, 1))
    else:
        assert_close(out, ref, 1, atol=2.0 ** -7 * magnitude)


def varlen_case(new_tokens, context_lens, H, KV, hd, block_size, dtype):
    """Ragged prefills packed as the engine packs them: q [sum(new_tokens), H, hd]."""
    _, k_cache, v_cache, tables, lens = paged_case(context_lens, H, KV, hd, block_size, dtype)
    q = torch.randn(sum(new_tokens), H, hd, dtype=dtype)
    cu = torch.tensor([0] + new_tokens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return q, k_cache, v_cache, tables, cu, lens


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("new_tokens,context_lens,H,KV,hd,block_size", [
    ([7, 5, 1], [7, 13, 9], 6, 2, 16, 4),    # fresh, cached prefix of 8, one new token; GQA groups of 3
    ([20, 3], [20, 40], 4, 1, 16, 8),        # MQA: several query tiles, two key tiles
    ([9, 0, 2], [9, 4, 6], 2, 2, 16, 4),     # MHA; a sequence with no new tokens takes no rows
])
def test_paged_attention_prefill_varlen(impl, dtype, new_tokens, context_lens, H, KV, hd, block_size, poisoned):
    q, k_cache, v_cache, tables, cu, lens = varlen_case(new_tokens, context_lens, H, KV, hd, block_size, dtype)
    out = run(impl, kernels.paged_attention_prefill_varlen, q, k_cache, v_cache, tables, cu, lens, hd ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    for s, L in enumerate(context_lens):
        lo, hi = int(cu[s]), int(cu[s + 1])
        if lo == hi:
            continue
        ref, magnitude = prefill_ref(q[lo:hi], k_cache, v_cache, tables[s], L, hd ** -0.5)
        if impl == "triton" or dtype == torch.float32:
            assert_close(out[lo:hi], ref, bf16_ulps(dtype, 1))  # fp32 inside, one rounding on the store
        else:
            assert_close(out[lo:hi], ref, 1, atol=2.0 ** -7 * magnitude)


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_attention_prefill_varlen_rejects_bad_inputs(impl):
    q, k_cache, v_cache, tables, cu, lens = varlen_case([3, 2], [3, 6], 4, 2, 16, 4, torch.float32)
    op = kernels.paged_attention_prefill_varlen
    with pytest.raises(ValueError, match=r"^paged_attention_prefill_varlen: q \(5, 3, 16\) does not fit a cache "
                                         r"of \(4, 4, 2, 16\) \(query heads must be a multiple of KV heads\)$"):
        run(impl, op, q[:, :3], k_cache, v_cache, tables, cu, lens, 1.0)
    with pytest.raises(ValueError, match=r"^paged_attention_prefill_varlen: block_tables \(2, 3\), cu_seqlens_q "
                                         r"\(2,\) and context_lens \(2,\) must be \[S, max_blocks\], \[S \+ 1\] and \[S\]$"):
        run(impl, op, q, k_cache, v_cache, tables, cu[1:], lens, 1.0)
    with pytest.raises(TypeError, match=r"^paged_attention_prefill_varlen: cu_seqlens_q must be int32, got torch.int64$"):
        run(impl, op, q, k_cache, v_cache, tables, cu.long(), lens, 1.0)
    with pytest.raises(ValueError, match=r"^paged_attention_prefill_varlen: cu_seqlens_q must rise from 0 to the 5 "
                                         r"query rows, got \[0, 3, 4\]$"):
        run(impl, op, q, k_cache, v_cache, tables, torch.tensor([0, 3, 4], dtype=torch.int32), lens, 1.0)
    with pytest.raises(ValueError, match=r"^paged_attention_prefill_varlen: sequence 1 has 2 new tokens and "
                                         r"context_len 13, its block table holds 12 tokens$"):
        run(impl, op, q, k_cache, v_cache, tables, cu, torch.tensor([3, 13], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="sequence 0 has 3 new tokens and context_len 2"):
        run(impl, op, q, k_cache, v_cache, tables, cu, torch.tensor([2, 6], dtype=torch.int32), 1.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_ops_reject_shapes_that_do_not_fit(impl):
    k_cache = v_cache = torch.zeros(4, 2, 3, 8)  # 3 KV heads
    tables, lens = torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        run(impl, kernels.paged_attention_decode, torch.zeros(1, 4, 8), k_cache, v_cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match="must have 2 rows"):
        run(impl, kernels.paged_attention_decode, torch.zeros(2, 6, 8), k_cache, v_cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match="do not agree"):
        run(impl, kernels.paged_attention_prefill, torch.zeros(5, 6, 8), k_cache, v_cache, tables[0], 3, 1.0)
    with pytest.raises(ValueError, match="do not fit a cache"):
        run(impl, kernels.store_kv, torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), k_cache, v_cache,
            torch.zeros(1, dtype=torch.long))


# ------------------------------------------------------------------------------ the switch

def test_backend_switch():
    x = torch.zeros(1)
    with settings.override(backend="triton"):  # as TINYMOE_BACKEND=triton installs it
        assert backend.backend_for(x) == "triton"
        with kernels.use_backend("auto"):
            assert backend.backend_for(x) == "torch"  # auto: torch for CPU tensors
            with kernels.use_backend("triton"):
                assert backend.backend_for(x) == "triton"
            assert kernels.current_backend() == "auto"
        assert kernels.current_backend() == "triton"
    with pytest.raises(ValueError) as e:
        kernels.use_backend("cuda")
    assert str(e.value) == "unknown kernel backend 'cuda'; valid: triton, torch, auto"
