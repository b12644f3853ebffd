"""moe_align and the grouped expert GEMM: each Triton kernel (run by Triton's interpreter on CPU)
and moe_align's torch twin against float64 references on fresh random inputs, with poisoned
outputs. (The GEMM's torch twin is the whole op's, `moe_experts`: tests/test_moe_op.py.)"""
import pytest
import torch
import torch.nn.functional as F

from tinymoe import kernels
from tinymoe.experts import Copy, ExpertPlan, Experts
from tinymoe.experts.pools import FullPool, build_pool
from tinymoe.kernels import backend, quant
from tinymoe.kernels.moe_align import moe_align
from tinymoe.kernels.moe_gemm import fused_moe

IMPLS = ["triton", "torch"]


@pytest.fixture(autouse=True)
def interpreter():
    if not backend.interpreting():
        pytest.fail("Triton's interpreter is off in this process: triton was imported before "
                    "TRITON_INTERPRET=1 was set")


@pytest.fixture
def poisoned(monkeypatch):
    """Fresh tensors from torch.empty come filled with NaN (or -7 for integers)."""
    make = torch.empty

    def made(*args, **kwargs):
        t = make(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)
    monkeypatch.setattr(torch, "empty", made)


def align_reference(copy_ids, num_copies, block_m):
    """Plain Python: per copy, its assignments in order, padded with the sentinel to the tile."""
    flat = copy_ids.reshape(-1).tolist()
    n = len(flat)
    sorted_ids, tiles = [], []
    for c in range(num_copies):
        run = [i for i, x in enumerate(flat) if x == c]
        run += [n] * (-len(run) % block_m)
        sorted_ids += run
        tiles += [c] * (len(run) // block_m)
    return sorted_ids, tiles


ALIGN_CASES = [  # (assignments T*k as (T, k), copies, block_m)
    ((1, 1), 4, 16),    # a single token: three copies without tokens
    ((7, 2), 6, 4),     # runs not a multiple of the tile
    ((40, 3), 5, 16),   # a run longer than one tile
    ((3, 2), 64, 16),   # many more copies than assignments
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,copies,block_m", ALIGN_CASES)
def test_align_matches_reference(impl, shape, copies, block_m, poisoned):
    ids = torch.randint(0, copies, shape, dtype=torch.int32)
    ids.view(-1)[0] = copies - 1
    with kernels.use_backend(impl):
        sorted_ids, tile_copy = moe_align(ids, copies, block_m)
    ref_sorted, ref_tiles = align_reference(ids, copies, block_m)
    n = ids.numel()
    assert sorted_ids[:len(ref_sorted)].tolist() == ref_sorted
    assert (sorted_ids[len(ref_sorted):] == n).all()
    assert tile_copy[:len(ref_tiles)].tolist() == ref_tiles
    assert (tile_copy[len(ref_tiles):] == -1).all()


def reference_moe(x, topk_weights, copy_ids, weights_of_copy):
    """float64: out[t * k + s] = w[t, s] * down(silu(gate x_t) * up x_t) with copy_ids[t, s]'s weights."""
    T, k = copy_ids.shape
    out = torch.full((T * k, x.shape[1]), float("nan"), dtype=torch.float64)
    for t in range(T):
        for s in range(k):
            c = int(copy_ids[t, s])
            if c not in weights_of_copy:
                continue
            wg, wu, wd = weights_of_copy[c]
            xt = x[t].double()
            out[t * k + s] = topk_weights[t, s].double() * (wd @ (F.silu(wg @ xt) * (wu @ xt)))
    return out


def decoded(qw):
    """float64 values of one QWeight matrix, decoded here from the documented layout."""
    if qw.precision == "int8":
        return qw.q.double() * qw.scales.double()[:, None]
    codes = torch.stack((qw.q & 15, qw.q >> 4), -1).flatten(-2).double()  # input k: byte k // 2, nibble k % 2
    scale, zero = (qw.scales[..., i].double().repeat_interleave(qw.group, -1) for i in (0, 1))
    return ((codes - 8) * scale + zero)[:, :qw.cols]


def dense_of(pool, row):
    """float64 (gate, up, down) of a pool's row."""
    w = pool.kernel_weights()
    I = w.inter
    if w.precision == "full":
        w13, w2 = w.w13[row].double(), w.w2[row].double()
    else:
        w13, w2 = decoded(w.w13.row(row)), decoded(w.w2.row(row))
    return w13[:I], w13[I:2 * I], w2


def make_pool(precision, n, I, D, dtype, group=quant.INT4_GROUP):
    w13 = (torch.randn(n, 2 * I, D) / D ** 0.5).to(dtype)
    w2 = (torch.randn(n, D, I) / I ** 0.5).to(dtype)
    if precision == "full":
        return FullPool(w13, w2)
    return build_pool(precision, list(range(n)), lambda e: (w13[e, :I], w13[e, I:], w2[e]), group, dtype, "cpu",
                      I, D)


GEMM_CASES = [  # (precision, activation dtype, T, k, copies, I, D)
    ("full", torch.float32, 1, 1, 3, 32, 48),     # one token, copies without tokens
    ("full", torch.bfloat16, 9, 2, 4, 40, 32),
    ("full", torch.float16, 5, 2, 3, 32, 32),
    ("int8", torch.bfloat16, 9, 2, 3, 48, 32),
    ("int8", torch.float32, 1, 2, 4, 32, 48),
    ("int4", torch.bfloat16, 9, 2, 3, 64, 64),
    ("int4", torch.float32, 3, 2, 3, 40, 48),     # K padded to the int4 group (64) in both matrices
]


@pytest.mark.parametrize("precision,dtype,T,k,copies,I,D", GEMM_CASES)
def test_fused_moe_matches_float64(precision, dtype, T, k, copies, I, D, poisoned):
    pool = make_pool(precision, copies, I, D, dtype)
    x = torch.randn(T, D).to(dtype)
    topk_weights = torch.rand(T, k).to(dtype)
    copy_ids = torch.randint(0, copies - 1, (T, k))  # the last copy never gets a token
    block_m = 16
    sorted_ids, tile_copy = moe_align(copy_ids.int(), copies, block_m)
    out = torch.full((T * k, D), float("nan"))
    fused_moe(x, topk_weights, sorted_ids, tile_copy, torch.arange(copies, dtype=torch.int32),
              pool.kernel_weights(), out, block_m)
    ref = reference_moe(x, topk_weights, copy_ids, {c: dense_of(pool, c) for c in range(copies)})
    assert torch.isfinite(out).all()
    # fp32 accumulation of the operands as given (the interpreter upcasts them)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group,D", [(32, 48), (128, 160)])
def test_fused_moe_reads_each_int4_group(group, D, poisoned):
    """int4 groups of 32 and 128 (the default, 64, is above), with D padded to the group."""
    I = 32
    pool = make_pool("int4", 2, I, D, torch.bfloat16, group)
    w = pool.kernel_weights()
    assert (w.w13.group, w.w13.padded_cols, w.w2.group) == (group, -(-D // group) * group, 32)
    x, topk_weights = torch.randn(5, D).bfloat16(), torch.rand(5, 2).bfloat16()
    copy_ids = torch.randint(0, 2, (5, 2))
    sorted_ids, tile_copy = moe_align(copy_ids.int(), 2, 16)
    out = torch.full((10, D), float("nan"))
    fused_moe(x, topk_weights, sorted_ids, tile_copy, torch.arange(2, dtype=torch.int32), w, out, 16)
    ref = reference_moe(x, topk_weights, copy_ids, {c: dense_of(pool, c) for c in range(2)})
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_each_pool_writes_only_its_own_rows():
    """Two pools over one copy-id space: copies 0, 2 in an int8 pool (rows 1, 0), 1, 3 in int4."""
    T, k, I, D = 6, 2, 32, 64
    int8, int4 = make_pool("int8", 2, I, D, torch.bfloat16), make_pool("int4", 2, I, D, torch.bfloat16)
    tables = {"int8": torch.tensor([1, -1, 0, -1], dtype=torch.int32),
              "int4": torch.tensor([-1, 0, -1, 1], dtype=torch.int32)}
    x, topk_weights = torch.randn(T, D), torch.rand(T, k)
    copy_ids = torch.randint(0, 4, (T, k))
    copy_ids[0] = torch.tensor([0, 1])
    sorted_ids, tile_copy = moe_align(copy_ids.int(), 4, 16)
    out = torch.full((T * k, D), float("nan"))
    fused_moe(x, topk_weights, sorted_ids, tile_copy, tables["int8"], int8.kernel_weights(), out, 16)
    in_int8 = (copy_ids.reshape(-1) % 2 == 0)
    assert torch.isfinite(out[in_int8]).all() and torch.isnan(out[~in_int8]).all()
    fused_moe(x, topk_weights, sorted_ids, tile_copy, tables["int4"], int4.kernel_weights(), out, 16)
    dense = {0: dense_of(int8, 1), 2: dense_of(int8, 0), 1: dense_of(int4, 0), 3: dense_of(int4, 1)}
    torch.testing.assert_close(out.double(), reference_moe(x, topk_weights, copy_ids, dense),
                               rtol=1e-4, atol=1e-5)


def test_experts_triton_path_matches_torch_path():
    """The whole layer through moe_align + one launch pair per pool, with a mixed plan of replicas."""
    E, I, D, T, k = 4, 32, 64, 7, 2
    ex = Experts(torch.randn(E, I, D) / 8, torch.randn(E, I, D) / 8, torch.randn(E, D, I) / 6)
    ex.apply_plan(ExpertPlan([Copy(0), Copy(1, "int8"), Copy(2), Copy(3, "int4"), Copy(2, "int8"),
                              Copy(0, "int4")]))
    x = torch.randn(T, D)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k)
    with kernels.use_backend("torch"):
        want = ex(x, ids, w)
    with kernels.use_backend("triton"):
        got = ex(x, ids, w)
    # the torch path feeds bf16 activations to the quantised CPU kernels; the Triton one stays fp32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
