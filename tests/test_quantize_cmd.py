"""`tinymoe quantize`: the written checkpoint (read back by the safetensors library), its
config.json, and that loading it gives the on-the-fly quantised model bit for bit; bad outputs
and specs are one line before any work."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from tinymoe import load_model
from tinymoe.cli import cli
from tinymoe.models import checkpoint_writer
from tinymoe.models.checkpoint_writer import write_quantized
from tinymoe.models.quantize import parse_quant
from tinymoe.weights import ASSETS

EMBEDDED = ASSETS / "tiny-mixtral"
# a per-part spec: every part in another precision, one left full
PER_PART = "experts=int4,shared=int8,dense=int4,attn=int8"


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["mixtral", "qwen3", "deepseek", "embedded"])
def source(request, tiny_mixtral, tiny_qwen3, tiny_deepseek):
    paths = {"mixtral": tiny_mixtral, "qwen3": tiny_qwen3, "deepseek": tiny_deepseek, "embedded": EMBEDDED}
    return paths[request.param]


@pytest.mark.parametrize("spec", ["int8", "int4", PER_PART])
def test_written_checkpoint_loads_as_the_on_the_fly_model(source, spec, tmp_path):
    out = tmp_path / "q"
    res = write_quantized(source, spec, out)
    written = load_model(out)
    direct = load_model(source, quant=spec)
    assert written.quant == direct.quant == parse_quant(spec)
    a, b = written.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = _ids(written.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(written(ids), direct(ids))
    tensors = _read_all(out)
    assert res["tensors"] == len(tensors)
    assert res["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert res["bytes"] < res["source_bytes"]


def test_the_files_and_their_layout(tiny_deepseek, tmp_path):
    out = tmp_path / "q"
    write_quantized(tiny_deepseek, "experts=int4:g32,attn=int8,head=int8", out)
    raw = json.loads((out / "config.json").read_text())
    assert raw["quantization_config"] == {
        "quant_method": "tinymoe", "format_version": 1, "int4_group": 32,
        "parts": {"experts": "int4", "shared": "full", "dense": "full", "attn": "int8", "head": "int8"}}
    source = json.loads((tiny_deepseek / "config.json").read_text())
    assert {k: v for k, v in raw.items() if k != "quantization_config"} == source
    t = _read_all(out)
    with safe_open(str(tiny_deepseek / "model.safetensors"), "pt") as st:
        orig = {k: st.get_tensor(k) for k in st.keys()}
    # quantised: codes and scales under the HF module name; experts per expert in the family's layout
    assert t["model.layers.1.self_attn.q_proj.qweight"].dtype == torch.int8
    assert t["model.layers.1.self_attn.q_proj.scales"].shape == (48,)
    assert t["lm_head.qweight"].shape == (96, 48)
    e = t["model.layers.1.mlp.experts.3.down_proj.qweight"]  # [D=48, I=16 -> 32 padded, packed in pairs]
    assert e.dtype == torch.uint8 and e.shape == (48, 16)
    assert t["model.layers.1.mlp.experts.3.down_proj.scales"].shape == (48, 1, 2)
    # full precision: the source's tensors, bit for bit
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.gate.weight", "model.layers.0.mlp.up_proj.weight",
                 "model.layers.2.mlp.shared_experts.down_proj.weight", "model.norm.weight"):
        assert t[name].dtype == orig[name].dtype and torch.equal(t[name], orig[name]), name
    assert not any(n.endswith(("q_proj.weight", "experts.0.gate_proj.weight")) for n in t)


def test_sharded_output_and_copied_tokenizer(tmp_path):
    out = tmp_path / "q"
    write_quantized(EMBEDDED, "int8", out, shard_bytes=2 << 20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _read_all(out).values())
    for f in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (EMBEDDED / f).read_bytes()
    ids = _ids(4096)
    with torch.no_grad():
        assert torch.equal(load_model(out)(ids), load_model(EMBEDDED, quant="int8")(ids))


def test_a_quantised_checkpoint_refuses_another_quant(tmp_path):
    out = tmp_path / "q"
    write_quantized(EMBEDDED, "attn=int8,head=int4", out)
    assert load_model(out, quant="head=int4,attn=int8").quant == parse_quant("attn=int8,head=int4")
    for other in ("int8", "none"):
        with pytest.raises(ValueError) as e:
            load_model(out, quant=other)
        assert str(e.value) == (f"{out} holds weights quantised as attn=int8,head=int4, not "
                                f"{parse_quant(other).describe()}: load it without quant, or quantise the original "
                                f"checkpoint")
    with pytest.raises(ValueError) as e:
        write_quantized(out, "int8", tmp_path / "again")
    assert str(e.value) == f"{out} is already a quantised checkpoint; quantise the original one"


def test_bad_outputs_fail_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_writer, "_jobs", lambda *a: pytest.fail("work started"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    afile = tmp_path / "file"
    afile.write_text("")
    cases = [(busy, f"the output directory {busy} exists and is not empty"),
             (EMBEDDED, f"the output directory {EMBEDDED} is the source checkpoint; write to a new directory"),
             (afile, f"the output {afile} is a file, not a directory")]
    for out, message in cases:
        with pytest.raises(ValueError) as e:
            write_quantized(EMBEDDED, "int8", out)
        assert str(e.value) == message
    with pytest.raises(ValueError) as e:
        write_quantized(EMBEDDED, "none", tmp_path / "n")
    assert str(e.value) == "quant spec 'none' quantises nothing; give int8, int4 or parts, e.g. experts=int4,attn=int8"
    assert not (tmp_path / "n").exists()


def test_a_stored_tensor_of_the_wrong_format_is_one_line(tmp_path):
    out = tmp_path / "q"
    write_quantized(EMBEDDED, "head=int4", out)
    raw = json.loads((out / "config.json").read_text())
    raw["quantization_config"]["int4_group"] = 32  # the codes were written with group 64
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as e:
        load_model(out)
    assert str(e.value) == (f"{out}: lm_head.scales is BF16 [4096, 4, 2], expected BF16 [4096, 8, 2] "
                            f"for int4 (int4 group 32)")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_the_command(tmp_path):
    out = tmp_path / "q"
    res = run("quantize", EMBEDDED, "--quant", "experts=int4,attn=int8,head=int8", "--out", out)
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines()[-1].startswith(f"wrote {out}: experts=int4,attn=int8,head=int8, ")
    assert load_model(out).quant == parse_quant("experts=int4,attn=int8,head=int8")
    again = run("quantize", EMBEDDED, "--quant", "int8", "--out", out)
    assert again.exit_code == 1 and again.stderr == f"Error: the output directory {out} exists and is not empty\n"
    bad = run("quantize", EMBEDDED, "--quant", "int4:g16", "--out", tmp_path / "b")
    assert bad.exit_code == 2
    assert ("Invalid value for '--quant': quant spec 'int4:g16': int4 group 'g16' is not one of g32, g64, g128"
            in bad.stderr)
    assert not (tmp_path / "b").exists()
    generated = run("generate", out, "--prompt", "In the beginning", "--max-tokens", 6)
    direct = run("generate", EMBEDDED, "--quant", "experts=int4,attn=int8,head=int8", "--prompt", "In the beginning",
                 "--max-tokens", 6)
    assert generated.exit_code == 0 and generated.stdout == direct.stdout and generated.stdout.strip()


def test_a_tied_head_is_written_quantised_from_the_embeddings(tmp_path):
    import checkpoints
    src = checkpoints.mixtral(tmp_path / "tied", tie_word_embeddings=True)
    with safe_open(str(src / "model.safetensors"), "pt") as st:
        assert "lm_head.weight" not in st.keys()
    for spec in ("head=int8", "attn=int8"):
        out = tmp_path / spec.replace("=", "-")
        write_quantized(src, spec, out)
        names = set(_read_all(out))
        assert ("lm_head.qweight" in names) == (spec == "head=int8") and "lm_head.weight" not in names
        ids = _ids(96)
        with torch.no_grad():
            assert torch.equal(load_model(out)(ids), load_model(src, quant=spec)(ids))
