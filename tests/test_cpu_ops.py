"""The native CPU ops (tinymoe/kernels/cpu_ops.cpp) against their torch twins and float64."""
import pytest
import torch

from tinymoe.kernels import activation, attention, native, norm, rotary

needs_native = pytest.mark.skipif(native.native() is None, reason="no C++ compiler or no AVX2 here")


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 steps between two bf16 tensors (same sign assumed near zero)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    return int((ia - ib).abs().max()) if a.numel() else 0


@needs_native
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_its_twin(residual):
    torch.manual_seed(0)
    x, w = torch.randn(5, 3, 1000).bfloat16(), torch.randn(1000).bfloat16()
    r = torch.randn(5, 3, 1000).bfloat16() if residual else None
    got, want = norm.rms_norm_native(x, w, 1e-5, r), norm.rms_norm_torch(x, w, 1e-5, r)
    if residual:
        assert torch.equal(got[1], want[1])  # the rounded sum x + residual
        got, want = got[0], want[0]
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert bf16_ulps(got, want) <= 1  # the mean of squares may sum in another order


@needs_native
def test_rotary_on_a_strided_view_matches_its_twin():
    torch.manual_seed(1)
    B, T, H, hd = 2, 5, 3, 64
    fused = torch.randn(B, T, (H + 2) * hd).bfloat16()  # like a fused q/k/v projection's output
    x = fused[..., :H * hd].view(B, T, H, hd)
    angles = torch.rand(T, hd // 2) * 6
    got = rotary.apply_rotary_native(x, angles.cos(), angles.sin())
    assert torch.equal(got, rotary.apply_rotary_torch(x, angles.cos(), angles.sin()))


@needs_native
@pytest.mark.parametrize("inter", [3584, 13])
def test_swiglu_matches_its_twin_bit_for_bit(inter):
    torch.manual_seed(2)
    h = (torch.randn(4, 2 * inter) * 5).bfloat16()
    h[0, :6] = torch.tensor([100.0, -100.0, 0.0, -0.0, 88.0, -87.5])  # exp's range edges
    got, want = activation.swiglu_native(h, inter), activation.swiglu_torch(h, inter)
    assert torch.equal(got, want)


@needs_native
def test_swiglu_keeps_nan_and_inf_where_torch_does():
    h = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0] + [1.0] * 4]).bfloat16()
    got, want = activation.swiglu_native(h, 4), activation.swiglu_torch(h, 4)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])


@needs_native
def test_store_kv_writes_strided_rows_into_their_slots():
    torch.manual_seed(3)
    N, KV, hd = 4, 2, 8
    fused = torch.randn(N, 3 * KV * hd).bfloat16()
    k, v = fused[:, KV * hd:2 * KV * hd].view(N, KV, hd), fused[:, 2 * KV * hd:].view(N, KV, hd)
    slots = torch.tensor([9, 0, 31, 4])
    caches = [torch.zeros(4, 8, KV, hd).bfloat16() for _ in range(4)]
    attention.store_kv_native(k, v, caches[0], caches[1], slots)
    attention.store_kv_torch(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0].abs().sum() > 0


@needs_native
# the last case is long enough for two threads, so one sequence's KV heads are split among them
# (H / KV query heads a KV head: 4, 1, 8, 4, 3 (a head at a time), 2 and 1 with head sizes of 12 and
# 12 vectors, not whole passes of 8 / G)
@pytest.mark.parametrize("B,H,KV,hd,lens", [(1, 16, 4, 64, [160]), (3, 4, 4, 32, [1, 17, 40]),
                                            (2, 8, 1, 128, [33, 5]), (1, 16, 4, 128, [600]), (1, 6, 2, 64, [70]),
                                            (2, 8, 4, 96, [50, 20]), (1, 2, 2, 96, [40])])
def test_paged_decode_matches_float64(B, H, KV, hd, lens):
    torch.manual_seed(4)
    bs = 16
    width = -(-max(lens) // bs)
    blocks = width + 4
    kc, vc = torch.randn(blocks, bs, KV, hd).bfloat16(), torch.randn(blocks, bs, KV, hd).bfloat16()
    q = torch.randn(B, H, hd).bfloat16()
    tables = torch.stack([torch.randperm(blocks)[:width] for _ in range(B)]).int()
    context = torch.tensor(lens, dtype=torch.int32)
    got = attention.paged_attention_decode_native(q, kc, vc, tables, context, hd ** -0.5)
    want = attention.paged_attention_decode_torch(q.double(), kc.double(), vc.double(), tables, context, hd ** -0.5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=4e-3)  # one bf16 rounding


@needs_native
def test_unsupported_inputs_fall_back_to_the_twin():
    x = torch.randn(2, 8)  # fp32: the native ops take bf16 only
    assert norm.rms_norm_native(x, torch.ones(8), 1e-6) is NotImplemented
    assert activation.swiglu_native(x, 4) is NotImplemented
    assert torch.equal(activation.swiglu(x, 4), activation.swiglu_torch(x, 4))
