"""Every bad checkpoint gets a one-line error that names the file and tensor."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
import tinymoe
from tinymoe.config import ConfigError
from tinymoe.weights import CheckpointError, resolve


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def ckpt(tiny_deepseek, tmp_path):
    """A private copy of a single-file checkpoint to break."""
    return shutil.copytree(tiny_deepseek, tmp_path / "ckpt")


def test_missing_alias_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(CheckpointError) as e:
        tinymoe.load_model("mixtral")
    msg = one_line(e)
    assert "mistralai/Mixtral-8x7B-Instruct-v0.1" in msg
    assert str(tmp_path / "hf" / "hub") in msg
    assert "huggingface-cli download mistralai/Mixtral-8x7B-Instruct-v0.1" in msg


def test_repo_id_found_in_hf_cache(tiny_deepseek, tmp_path, monkeypatch):
    root = tmp_path / "hf" / "hub" / "models--deepseek-ai--deepseek-moe-16b-chat"
    snap = root / "snapshots" / "abc123"
    shutil.copytree(tiny_deepseek, snap)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert resolve("deepseek-moe") == snap
    assert resolve("deepseek-ai/deepseek-moe-16b-chat") == snap
    assert tinymoe.load_model("deepseek-moe").config.family == "deepseek_moe"


def test_unknown_name_and_missing_directory(tmp_path):
    with pytest.raises(CheckpointError) as e:
        resolve("no-such-model")
    assert "alias" in one_line(e)
    with pytest.raises(CheckpointError) as e:
        resolve(tmp_path)
    assert "no config.json" in one_line(e)


def test_unknown_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError) as e:
        tinymoe.load_model(ckpt)
    msg = one_line(e)
    assert "GPT2LMHeadModel" in msg and "MixtralForCausalLM" in msg and "DeepseekForCausalLM" in msg


def test_missing_shard(tmp_path):
    path = checkpoints.mixtral(tmp_path, shard=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (path / shard).unlink()
    with pytest.raises(CheckpointError) as e:
        tinymoe.load_model(path)
    assert shard in one_line(e) and "missing" in str(e.value)


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError) as e:
        tinymoe.load_model(ckpt)
    assert "truncated" in one_line(e) and "model.safetensors" in str(e.value)


def test_corrupt_header(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"#garbage####"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        tinymoe.load_model(ckpt)
    assert "not a valid safetensors file" in one_line(e)


def test_missing_tensor(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        tinymoe.load_model(ckpt)
    assert "model.layers.2.mlp.experts.5.up_proj.weight" in one_line(e)


def test_wrong_shape(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(7, 48)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        tinymoe.load_model(ckpt)
    msg = one_line(e)
    assert "model.layers.1.self_attn.k_proj.weight" in msg and "[7, 48]" in msg and "model.safetensors" in msg


def test_bad_dtype_argument(tiny_deepseek):
    with pytest.raises(ValueError, match="unknown dtype"):
        tinymoe.load_model(tiny_deepseek, dtype="int3")


def test_a_file_inside_a_checkpoint_means_its_folder(tmp_path):
    path = checkpoints.mixtral(tmp_path / "m", shard=True)
    shard = sorted(path.glob("*.safetensors"))[0]
    for f in (shard, path / "config.json", path / "model.safetensors.index.json"):
        assert resolve(f) == path and resolve(str(f)) == path
    assert tinymoe.load_model(shard).config.family == "mixtral"
    stray = tmp_path / "weights.safetensors"
    stray.write_bytes(shard.read_bytes())
    with pytest.raises(CheckpointError) as e:
        tinymoe.load_model(stray)
    assert one_line(e) == (f"{stray} is a file and its folder has no config.json; pass the checkpoint directory "
                           "(the one holding config.json and the .safetensors files)")
    with pytest.raises(CheckpointError) as e:
        resolve(tmp_path / "missing.safetensors")
    assert one_line(e) == f"model {str(tmp_path / 'missing.safetensors')!r} not found: no such file or directory"
