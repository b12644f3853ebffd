"""Whole-model quantisation (--quant): the spec and its errors, every part really quantised (codes
equal to the reference quantiser on the checkpoint's own tensors, bytes as the format says),
gates and embeddings kept, logits near the full-precision model's, greedy generation through
the engine, and peak memory while loading."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tinymoe
from tinymoe import LLM, SamplingParams, load_model
from tinymoe.config import ConfigError, load_config
from tinymoe.kernels import quant as kq
from tinymoe.models import quantize as mq
from tinymoe.models.quantize import PARTS, QuantSpec, parse_quant
from tinymoe.models.transformer import Linear
from tinymoe.weights import ASSETS

ROOT = Path(__file__).resolve().parents[1]


# --- the spec -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, parts, group", [
    (None, {}, 64), ("none", {}, 64), ("bf16", {}, 64), ("full", {}, 64), (" int8 ", dict.fromkeys(PARTS, "int8"), 64),
    # the one-word int4 keeps the LM head in int8, as llama.cpp's Q4_0 keeps it in Q6_K
    ("int4", {**dict.fromkeys(PARTS, "int4"), "head": "int8"}, 64),
    ("int4:g32", {**dict.fromkeys(PARTS, "int4"), "head": "int8"}, 32),
    ("experts=int4,shared=int4,dense=int4,attn=int4,head=int4", dict.fromkeys(PARTS, "int4"), 64),
    ("experts=int4,attn=int8,head=int8", {"experts": "int4", "attn": "int8", "head": "int8"}, 64),
    ("experts=int4:g128, shared=int8", {"experts": "int4", "shared": "int8"}, 128),
    ("dense=int8,head=full", {"dense": "int8"}, 64),
])
def test_parse_quant_forms(text, parts, group):
    spec = parse_quant(text)
    assert spec.parts() == {**dict.fromkeys(PARTS, "full"), **parts} and spec.int4_group == group
    assert parse_quant(spec.describe()) == spec and parse_quant(spec) is spec
    assert QuantSpec.from_config(spec.to_config()) == spec


def test_describe_and_config_form():
    assert parse_quant("int8").describe() == "int8"
    assert parse_quant("int4:g32").describe() == "int4:g32"
    assert parse_quant("head=int8,experts=int4").describe() == "experts=int4,head=int8"
    assert parse_quant(None).describe() == "none"
    assert parse_quant("experts=int4:g128,attn=int8").to_config() == {
        "quant_method": "tinymoe", "format_version": 1, "int4_group": 128,
        "parts": {"experts": "int4", "shared": "full", "dense": "full", "attn": "int8", "head": "full"}}
    # the group means nothing without an int4 part: such specs are equal
    assert QuantSpec(attn="int8", int4_group=32) == parse_quant("attn=int8")


@pytest.mark.parametrize("text, message", [
    ("", "quant spec is empty; use none, int8, int4, int4:g32 or per part experts=int4,attn=int8"),
    ("int3", "quant spec 'int3': unknown precision 'int3'; precisions: full, int8, int4"),
    ("int4:g48", "quant spec 'int4:g48': int4 group 'g48' is not one of g32, g64, g128"),
    ("int4:32", "quant spec 'int4:32': int4 group '32' is not one of g32, g64, g128"),
    ("int8:g32", "quant spec 'int8:g32': a group (:g32) applies to int4 only"),
    ("mlp=int8", "quant spec 'mlp=int8': unknown part 'mlp'; parts: experts, shared, dense, attn, head"),
    ("experts=int2", "quant spec 'experts=int2': unknown precision 'int2'; precisions: full, int8, int4"),
    ("attn=int8,attn=int4", "quant spec 'attn=int8,attn=int4' names 'attn' twice"),
    ("attn=int8,,head=int8", "quant spec 'attn=int8,,head=int8' has an empty item"),
    ("attn=int8,", "quant spec 'attn=int8,' has an empty item"),
    ("attn=int8,head", "quant spec 'attn=int8,head': 'head' is not PART=PRECISION"),
    ("attn=", "quant spec 'attn=': 'attn=' is not PART=PRECISION"),
    ("experts=int4:g32,attn=int4:g64",
     "quant spec 'experts=int4:g32,attn=int4:g64' gives several int4 groups; one group serves the whole model"),
])
def test_bad_specs_are_one_line(text, message):
    with pytest.raises(ValueError) as e:
        parse_quant(text)
    assert str(e.value) == message


def test_bad_spec_types_and_fields():
    with pytest.raises(TypeError) as e:
        parse_quant(8)
    assert str(e.value) == "quant takes a spec such as 'int8' or 'experts=int4,attn=int8', not int"
    with pytest.raises(ValueError) as e:
        QuantSpec(attn="fp8")
    assert str(e.value) == "unknown precision 'fp8' for attn; precisions: full, int8, int4"
    with pytest.raises(ValueError) as e:
        QuantSpec(int4_group=16)
    assert str(e.value) == "int4 group must be one of 32, 64, 128, got 16"


def _with_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    raw = json.loads((src / "config.json").read_text())
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps({**raw, **changes}))
    return dst


@pytest.mark.parametrize("qc, message", [
    ("int8", "quantization_config must be an object, got a string"),
    ({"quant_method": "gptq", "bits": 4},
     "quantization_config.quant_method 'gptq' is not supported: tinymoe reads only checkpoints written by "
     "`tinymoe quantize` (quant_method 'tinymoe')"),
    ({"quant_method": "tinymoe", "format_version": 2},
     "quantization_config.format_version 2 is not supported (this tinymoe reads format 1)"),
])
def test_bad_quantization_config_envelope(tiny_mixtral, tmp_path, qc, message):
    path = _with_config(tiny_mixtral, tmp_path / "m", quantization_config=qc)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}/config.json: {message}"


@pytest.mark.parametrize("qc, message", [
    ({"parts": ["attn"]}, "quantization_config.parts must be an object, got ['attn']"),
    ({"parts": {"mlp": "int8"}}, "quantization_config.parts has unknown part 'mlp'; parts: experts, shared, dense, "
                                 "attn, head"),
    ({"parts": {"attn": "int3"}}, "quantization_config.parts.attn is 'int3'; precisions: full, int8, int4"),
    ({"parts": {"attn": "int4"}, "int4_group": 48},
     "quantization_config.int4_group must be one of 32, 64, 128, got 48"),
])
def test_bad_quantization_config_parts_fail_before_loading(tiny_mixtral, tmp_path, qc, message):
    path = _with_config(tiny_mixtral, tmp_path / "m",
                        quantization_config={"quant_method": "tinymoe", "format_version": 1, **qc})
    (path / "model.safetensors").unlink()  # nothing may be read: the error comes first
    with pytest.raises(ValueError) as e:
        load_model(path)
    assert str(e.value) == f"{path}/config.json: {message}"


def test_bad_quant_fails_before_looking_for_the_model():
    with pytest.raises(ValueError) as e:
        load_model("/no/such/model", quant="int5")
    assert str(e.value) == "quant spec 'int5': unknown precision 'int5'; precisions: full, int8, int4"
    with pytest.raises(ValueError) as e:
        LLM("/no/such/model", quant="experts=int4,experts=int8")
    assert str(e.value) == "quant spec 'experts=int4,experts=int8' names 'experts' twice"


# --- what is quantised ----------------------------------------------------------------------

def _linears(model):
    """{module name: (Linear, its part)} for every projection (gates included, part None)."""
    return {n: (m, mq.part_of(n + ".weight", model.config)) for n, m in model.named_modules() if isinstance(m, Linear)}


def _reference(path: Path, name: str) -> torch.Tensor:
    """A tensor as the safetensors library reads it (independent of our reader)."""
    index = path / "model.safetensors.index.json"
    fname = json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors"
    with safe_open(str(path / fname), "pt") as f:
        return f.get_tensor(name)


HF_NAME = {"mixtral": "block_sparse_moe", "deepseek_moe": "mlp", "qwen3_moe": "mlp"}


EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "deepseek_moe": ("gate_proj", "up_proj", "down_proj"),
                "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("spec", ["int8", "int4", "int4:g32", "attn=int8,head=int4,dense=int4,shared=int8",
                                  "experts=int4,head=int8"])
def test_every_part_is_quantised_as_the_reference_quantiser(tiny_checkpoint, spec, monkeypatch):
    monkeypatch.setattr(mq, "CHUNK_ELEMENTS", 200)  # many chunks: chunking must not change a code
    q = parse_quant(spec)
    model = load_model(tiny_checkpoint, quant=spec)
    assert model.quant == q
    cfg, seen = model.config, set()
    for name, (lin, part) in _linears(model).items():
        precision = q.parts()[part] if part else "full"
        if precision == "full":
            assert not lin.quantised and isinstance(lin.kernel_weight(), torch.Tensor), name
            continue
        seen.add(part)
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            if cfg.moe_layers[layer]:
                name = name.replace(".mlp.", f".{HF_NAME[cfg.family]}.", 1)
        source = _reference(tiny_checkpoint, name + ".weight")
        want = kq.quantize(source, precision, q.int4_group)
        got = lin.kernel_weight()
        assert isinstance(got, kq.QWeight) and "weight" not in dict(lin.named_parameters()), name
        assert (got.precision, got.group, got.cols) == (want.precision, want.group, want.cols), name
        assert torch.equal(got.q, want.q) and torch.equal(got.scales, want.scales), name
        assert got.nbytes() == kq.matrix_bytes(*source.shape, precision, 4, q.int4_group), name
    present = {"attn", "head", *(["dense"] if not all(cfg.moe_layers) else []),
               *(["shared"] if cfg.num_shared_experts else [])}
    assert seen == {p for p in present if q.parts()[p] != "full"}
    for block in model.moe_blocks():  # routing stays exact
        assert all(p.dtype == torch.float32 for p in block.gate.parameters())
        assert not getattr(block.gate, "quantised", False)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    for block in model.moe_blocks():  # routed experts: a pool of codes, no full weights left
        ex, layer = block.experts, block.ctx.layer
        assert ex.base_precision == q.experts
        if q.experts == "full":
            continue
        assert ex.w_gate.numel() == ex.w_up.numel() == ex.w_down.numel() == 0
        pool = ex.pools[q.experts]
        want_bytes = 0
        for e in range(ex.num_experts):
            for got, hf in zip(pool.matrices(e), EXPERT_NAMES[cfg.family]):
                name = f"model.layers.{layer}.{HF_NAME[cfg.family]}.experts.{e}.{hf}.weight"
                source = _reference(tiny_checkpoint, name)
                want = kq.quantize(source, q.experts, q.int4_group)
                assert (got.precision, got.group) == (want.precision, want.group)
                assert torch.equal(got.q, want.q) and torch.equal(got.scales, want.scales), (layer, e, hf)
                want_bytes += want.nbytes()
        assert ex.resident_bytes() == want_bytes


def test_fused_qkv_is_the_three_quantised_matrices_stacked(tiny_qwen3):
    model = load_model(tiny_qwen3, quant="attn=int4:g32")
    for layer in model.model.layers:
        attn = layer.self_attn
        fused = attn.qkv_weight()
        parts = [attn.q_proj.kernel_weight(), attn.k_proj.kernel_weight(), attn.v_proj.kernel_weight()]
        assert fused.q.data_ptr() == parts[0].q.data_ptr()  # views: nothing stored twice
        assert torch.equal(fused.q, torch.cat([p.q for p in parts]))
        assert torch.equal(fused.scales, torch.cat([p.scales for p in parts]))
    moved = model.to(torch.float64)  # a dtype change leaves codes and bf16 scales alone
    qw = moved.model.layers[0].self_attn.o_proj.kernel_weight()
    assert qw.scales.dtype == torch.bfloat16 and qw.q.dtype == torch.uint8


def test_int8_bytes_and_nothing_full_left(tiny_deepseek):
    full = load_model(tiny_deepseek)
    q = load_model(tiny_deepseek, quant="attn=int8,head=int8,dense=int8,shared=int8")
    moved = sum(m.weight.numel() for n, (m, part) in _linears(full).items() if part)
    params = sum(p.numel() for p in q.parameters())
    buffers = sum(b.numel() * b.element_size() for lin, _ in _linears(q).values() for b in lin.buffers())
    assert params == sum(p.numel() for p in full.parameters()) - moved
    rows = sum(m.out_features for n, (m, part) in _linears(full).items() if part)
    assert buffers == moved + 2 * rows  # int8 codes + a bf16 scale per output channel


# --- accuracy -------------------------------------------------------------------------------

def _ids(vocab, shape=(2, 17), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("spec, bound", [("int8", 0.03), ("int4:g32", 0.25)])
def test_logits_close_to_full_precision(tiny_checkpoint, spec, bound):
    """Bound: max |logit error| over the full model's max |logit| below 3% for int8 (measured
    0.2-0.7% on these random checkpoints) and 25% for int4 (measured 4-9%)."""
    ids = _ids(96)
    with torch.no_grad():
        full = load_model(tiny_checkpoint)(ids)
        quant = load_model(tiny_checkpoint, quant=spec)(ids)
    assert _rel(quant, full) < bound


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
def test_logits_equal_dequantised_weights(tiny_checkpoint, native):
    """The quantised model computes with what its codes stand for: against the full model with
    every quantised weight replaced by dequantize(quantize(w)). On the torch path (dequantise,
    fp32 matmul) equal to fp32 rounding; the native int8 kernels also round the activations to
    int8 per block of 32 inputs: within 3% of the max logit there (measured 0.4-1.2%)."""
    from tinymoe import settings
    ids = _ids(96, seed=1)
    with settings.override(native=native):
        model = load_model(tiny_checkpoint, quant="int8")
        ref = load_model(tiny_checkpoint)
        with torch.no_grad():
            for name, (lin, part) in _linears(ref).items():
                if part in ("attn", "head", "dense", "shared"):
                    lin.weight.copy_(kq.dequantize(kq.quantize(lin.weight, "int8")))
            for block in ref.moe_blocks():
                for w in (block.experts.w_gate, block.experts.w_up, block.experts.w_down):
                    w.copy_(kq.dequantize(kq.quantize(w, "int8")))  # [E, N, K]: the format is per row
            assert _rel(model(ids), ref(ids)) < (3e-2 if native else 1e-6)


# --- the engine -----------------------------------------------------------------------------

def _greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("which, spec", [("fp32", "int8"), ("fp32", "attn=int4,head=int8,dense=int8,shared=int4"),
                                         ("bf16", "int8"), ("bf16", "int4")])
def test_greedy_generation_with_quant(which, spec, tiny_mixtral, tiny_deepseek):
    """LLM(quant=...) generates what full recomputation with the same quantised model picks."""
    path = {"fp32": tiny_deepseek, "bf16": ASSETS / "tiny-mixtral"}[which]
    llm = LLM(path, quant=spec)
    assert llm.model.quant == parse_quant(spec)
    prompt = [1, 5, 9, 13, 2, 7] if which == "fp32" else llm.tokenizer.encode("In the beginning God")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert out.token_ids == _greedy_reference(llm.model, prompt, 12)


def test_llm_refuses_quant_for_a_loaded_model(tiny_mixtral):
    with pytest.raises(ValueError) as e:
        LLM(load_model(tiny_mixtral), quant="int8")
    assert str(e.value) == "quant applies when LLM loads the model by name; pass load_model(..., quant=...) instead"


def test_public_names():
    assert tinymoe.parse_quant is parse_quant and tinymoe.QuantSpec is QuantSpec


# --- memory while loading -------------------------------------------------------------------

PEAK = r"""
import json, sys, torch, tinymoe
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
from tinymoe.config import load_config
from tinymoe.kernels.native import native
from tinymoe.models.transformer import Transformer
native()
with torch.device("meta"):  # its first construction imports ~150 MB of modules (torch's lazy ones)
    Transformer(load_config(sys.argv[1]))
before = status("VmRSS")  # from here only the load itself counts
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark VmHWM to the current RSS
model = tinymoe.load_model(sys.argv[1], quant=sys.argv[2] if sys.argv[2] != "-" else None)
held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(json.dumps({"peak": status("VmHWM") - before, "held": held}))
"""


def _peak(path, spec):
    out = subprocess.run([sys.executable, "-c", PEAK, str(path), spec], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    return json.loads(out.stdout)


def test_peak_memory_while_loading_stays_near_the_quantised_size(tmp_path):
    """An fp32 DeepSeek-layout checkpoint of 103 MiB, 84% of it in what --quant quantises (routed
    and shared experts, dense MLP, attention, head): loading it as int4 must not pass through a
    full-precision copy of any part. Peak RSS growth during the load (VmHWM, reset just before)
    must stay within the bytes the model holds afterwards plus 24 MiB for the transients (a
    tensor's mapped pages, a chunk's float temporaries, first-use allocations: a full load shows
    the same ~18 MiB). Measured here: int4 holds 28.3 MiB, peak 38.3; int8 37.9 / 52.9; the full
    model 103.1 / 121.0."""
    import checkpoints
    path = checkpoints.deepseek_moe(tmp_path / "ds", hidden_size=1024, intermediate_size=1024, vocab_size=4096,
                                    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
                                    n_routed_experts=8, moe_intermediate_size=256, n_shared_experts=1,
                                    num_experts_per_tok=2)
    full, int4 = _peak(path, "-"), _peak(path, "int4")
    mib = 2 ** 20
    assert int4["held"] < 0.3 * full["held"]
    assert int4["peak"] < int4["held"] + 24 * mib, (int4, full)
    assert full["peak"] > full["held"]  # the measure sees a full load
