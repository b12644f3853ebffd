"""Paths written for a GPU, tested without one: where seeded sampling makes its generator, how a
step's tensors reach the device, one varlen prefill-attention call per layer, and a rotary table
that never reads a device tensor. CUDA-only branches are checked through fakes of the torch calls
they make (this machine has no CUDA and the meta device has no generator or pinned memory)."""
import pytest
import torch

from tinymoe import kernels, load_model
from tinymoe.engine import LLM, SamplingParams
from tinymoe.engine import model_runner
from tinymoe.engine.sampler import generator_for, sample
from tinymoe.engine.sequence import Sequence

PROBS = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])


def seeded(seed=5):
    return Sequence([0], SamplingParams(temperature=1.0, seed=seed))


# --- seeded sampling ----------------------------------------------------------------------------

def test_seeded_generator_is_made_on_the_logits_device_at_the_first_sample():
    s, plain = seeded(), Sequence([0], SamplingParams(temperature=1.0))
    assert s.generator is None  # nothing device-bound at construction
    logits = PROBS.log().expand(2, -1).clone()
    sample(logits, [s, plain])
    assert s.generator.device == logits.device and plain.generator is None
    first = s.generator
    sample(logits, [s, plain])
    assert s.generator is first  # one stream per request, not reseeded


def test_seeded_stream_is_the_exponential_race_of_a_generator_from_the_seed():
    """Independent reference: argmax(p / E), E ~ Exp(1) drawn from a generator seeded alike."""
    s, g = seeded(9), torch.Generator().manual_seed(9)
    drawn = [sample(PROBS.log()[None].clone(), [s])[0] for _ in range(30)]
    expected = [int((PROBS / torch.empty(6).exponential_(generator=g)).argmax()) for _ in range(30)]
    assert drawn == expected


class FakeGenerator:
    """Stands in for torch.Generator on a device this machine lacks."""
    made = []

    def __init__(self, device="cpu"):
        self.device, self.seed = torch.device(device), None
        FakeGenerator.made.append(self)

    def manual_seed(self, seed):
        self.seed = seed
        return self


def test_seeded_generator_for_a_cuda_device_is_a_cuda_generator(monkeypatch):
    FakeGenerator.made = []
    monkeypatch.setattr(torch, "Generator", FakeGenerator)
    s, cuda = seeded(7), torch.device("cuda", 0)
    g = generator_for(s, cuda)
    assert FakeGenerator.made == [g] and g.device == cuda and g.seed == 7
    assert generator_for(s, cuda) is g and len(FakeGenerator.made) == 1
    assert generator_for(Sequence([0], SamplingParams(temperature=1.0)), cuda) is None


def test_sample_asks_for_the_generator_on_the_logits_device(monkeypatch):
    devices = []
    real = torch.Generator

    def recording(device=None):  # records None for a generator made without naming its device
        devices.append(device)
        return real(device=device)
    monkeypatch.setattr(torch, "Generator", recording)
    logits = PROBS.log().expand(3, -1).clone()
    sample(logits, [seeded(1), Sequence([0], SamplingParams(temperature=1.0)), seeded(2)])
    assert devices == [logits.device, logits.device]


def test_a_generator_on_another_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch, "Generator", FakeGenerator)
    s = seeded()
    generator_for(s, torch.device("cuda", 0))
    with pytest.raises(ValueError, match=rf"^request {s.seq_id}: its seeded generator is on cuda:0, "
                                         r"its logits on cpu$"):
        generator_for(s, torch.device("cpu"))


# --- step tensors -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
def test_step_tensors_on_the_cpu_are_plain_tensors(dtype):
    t = model_runner.step_tensor([[3, 1], [4, 1]], dtype, torch.device("cpu"))
    assert torch.equal(t, torch.tensor([[3, 1], [4, 1]], dtype=dtype)) and t.dtype == dtype
    assert t.device.type == "cpu" and not t.is_pinned()
    meta = model_runner.step_tensor([5, 9], dtype, torch.device("meta"))
    assert meta.device.type == "meta" and meta.shape == (2,)


def test_step_tensors_for_cuda_are_pinned_and_copied_without_waiting(monkeypatch):
    calls = []

    class Host:
        def to(self, *args, **kwargs):
            calls.append(("to", args, kwargs))
            return "on the device"

    def tensor(values, **kwargs):
        calls.append(("tensor", values, kwargs))
        return Host()
    monkeypatch.setattr(torch, "tensor", tensor)
    cuda = torch.device("cuda", 0)
    assert model_runner.step_tensor([1, 2], torch.int32, cuda) == "on the device"
    assert calls == [("tensor", [1, 2], {"dtype": torch.int32, "pin_memory": True}),
                     ("to", (cuda,), {"non_blocking": True})]


# --- prefill attention: one call per layer ------------------------------------------------------

@pytest.fixture(scope="module")
def mixtral_model(tiny_mixtral):
    return load_model(tiny_mixtral)


def test_prefills_of_a_step_share_one_varlen_call_per_layer(mixtral_model, monkeypatch):
    calls, real = [], kernels.paged_attention_prefill_varlen

    def counted(q, k_cache, v_cache, tables, cu_seqlens, lens, scale):
        calls.append((q.shape[0], cu_seqlens.tolist(), lens.tolist()))
        return real(q, k_cache, v_cache, tables, cu_seqlens, lens, scale)
    monkeypatch.setattr(kernels, "paged_attention_prefill_varlen", counted)
    monkeypatch.setattr(kernels, "paged_attention_prefill", None)  # the per-sequence op is not used
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
    LLM(mixtral_model, block_size=4).generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    layers = mixtral_model.config.num_layers
    # step 1 prefills all three prompts; the decode steps after it make no prefill call
    assert calls == [(15, [0, 5, 8, 15], [5, 3, 7])] * layers


# --- rotary tables ------------------------------------------------------------------------------

def test_rotary_off_the_cpu_never_reads_the_positions():
    """On the meta device a read (positions.max() -> int) raises: the table is built once for
    max_position, then only indexed."""
    from tinymoe.models.transformer import Rotary
    rotary = Rotary(16, 10000.0, max_position=300)
    positions = torch.arange(7, device="meta")
    with pytest.raises(RuntimeError):
        int(positions.max())
    cos, sin = rotary(positions)
    assert cos.device.type == sin.device.type == "meta" and cos.shape == sin.shape == (7, 8)
    assert rotary.cos.shape == (300, 8)
    table = rotary.cos
    rotary(torch.arange(40, device="meta"))
    assert rotary.cos is table  # built once


def test_rotary_on_the_cpu_grows_from_the_positions():
    from tinymoe.models.transformer import Rotary
    rotary = Rotary(16, 10000.0, max_position=300)
    positions = torch.tensor([0, 5, 999])  # past max_position: the CPU table grows as before
    cos, sin = rotary(positions)
    inv = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    angles = positions.double()[:, None] * inv
    assert torch.allclose(cos.double(), angles.cos(), atol=1e-4) and torch.allclose(sin.double(), angles.sin(), atol=1e-4)
    assert rotary.cos.shape[0] >= 1000


def test_the_model_gives_its_rotary_the_context_length(mixtral_model):
    assert mixtral_model.rotary.max_position == mixtral_model.config.max_position == 512
