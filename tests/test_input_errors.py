"""Bad input is one line naming the problem, raised before any weight is read or long work starts:
config.json fields, rope_scaling types, calibration files from another model, output paths."""
import json

import pytest
import torch
from click.testing import CliRunner

import checkpoints
import tinymoe
from tinymoe.cli import cli
from tinymoe.config import ConfigError
from tinymoe.models import loader
from tinymoe.routing import install
from tinymoe.routing.calibrate import Calibration, calibrate, load_calibration


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fails the test if the loader gets as far as opening the checkpoint's weights."""
    opened = []
    monkeypatch.setattr(loader, "Checkpoint", lambda path: opened.append(path) or pytest.fail("weights opened"))
    return opened


def write_config(tmp_path, base_dir, **changes):
    """tmp_path/config.json: base_dir's config.json with `changes` (None deletes a key)."""
    cfg = json.loads((base_dir / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def config_error(path, no_weights_read) -> str:
    with pytest.raises(ConfigError) as e:
        tinymoe.load_model(path)
    assert no_weights_read == []
    return one_line(e)


# --- config.json -----------------------------------------------------------------------------

MIXTRAL_BAD = [  # (changes, message after "<path>: ")
    (dict(num_experts_per_tok=7), "num_experts_per_tok (7) exceeds num_local_experts (6)"),
    (dict(hidden_size="abc"), "hidden_size must be a positive integer, got 'abc'"),
    (dict(num_local_experts=2.5), "num_local_experts must be a positive integer, got 2.5"),
    (dict(num_attention_heads=[6]), "num_attention_heads must be a positive integer, got [6]"),
    (dict(num_hidden_layers=True), "num_hidden_layers must be a positive integer, got True"),
    (dict(vocab_size=0), "vocab_size must be a positive integer, got 0"),
    (dict(num_experts_per_tok=-1), "num_experts_per_tok must be a positive integer, got -1"),
    (dict(vocab_size=None), "MixtralForCausalLM needs the key 'vocab_size'"),
    (dict(hidden_size=50), "hidden_size (50) is not divisible by num_attention_heads (6) and no head_dim is given"),
    (dict(num_key_value_heads=4), "num_attention_heads (6) is not a multiple of num_key_value_heads (4)"),
    (dict(head_dim=7), "head_dim (7) must be even (rotary embeddings rotate pairs)"),
    (dict(rms_norm_eps=-1e-5), "rms_norm_eps must be a positive number, got -1e-05"),
    (dict(rms_norm_eps="1e-5"), "rms_norm_eps must be a positive number, got '1e-5'"),
    (dict(max_position_embeddings=512.0), "max_position_embeddings must be a positive integer, got 512.0"),
    (dict(tie_word_embeddings="no"), "tie_word_embeddings must be true or false, got 'no'"),
    (dict(eos_token_id="2"), "eos_token_id must be a token id or a list of token ids, got '2'"),
    (dict(eos_token_id=[2, -1]), "eos_token_id must be a token id or a list of token ids, got [2, -1]"),
    (dict(bos_token_id=1.5), "bos_token_id must be a token id, got 1.5"),
    (dict(dtype=16), "dtype must be a string, got 16"),
    (dict(rope_parameters={"rope_theta": "big", "rope_type": "default"}),
     "rope_theta must be a positive number, got 'big'"),
    (dict(rope_parameters=[1]), "rope_parameters must be an object, got [1]"),
    (dict(architectures="MixtralForCausalLM"),
     "architectures must be a list naming the model class, got 'MixtralForCausalLM'; supported: "
     "MixtralForCausalLM, DeepseekForCausalLM, Qwen3MoeForCausalLM"),
    (dict(tinymoe_router={"type": "prototype", "latent_dim": 0, "temperature": 0.1}),
     'tinymoe_router must be {"type": "prototype", "latent_dim": a positive integer, "temperature": a positive '
     'number}, got {"type": "prototype", "latent_dim": 0, "temperature": 0.1}'),
]


@pytest.mark.parametrize("changes,message", MIXTRAL_BAD, ids=[m for _, m in MIXTRAL_BAD])
def test_bad_mixtral_config_field(tmp_path, tiny_mixtral, no_weights_read, changes, message):
    path = write_config(tmp_path, tiny_mixtral, **changes)
    assert config_error(path, no_weights_read) == f"{path / 'config.json'}: {message}"


def test_bad_deepseek_and_qwen3_config_fields(tmp_path, tiny_deepseek, tiny_qwen3, no_weights_read):
    cases = [
        (tiny_deepseek, dict(n_routed_experts=3), "num_experts_per_tok (4) exceeds n_routed_experts (3)"),
        (tiny_deepseek, dict(first_k_dense_replace=-1), "first_k_dense_replace must be an integer >= 0, got -1"),
        (tiny_deepseek, dict(moe_layer_freq=0), "moe_layer_freq must be a positive integer, got 0"),
        (tiny_deepseek, dict(n_shared_experts="2"), "n_shared_experts must be an integer >= 0, got '2'"),
        (tiny_deepseek, dict(norm_topk_prob=0), "norm_topk_prob must be true or false, got 0"),
        (tiny_qwen3, dict(num_local_experts=2), "num_experts_per_tok (3) exceeds num_local_experts (2)"),
        (tiny_qwen3, dict(num_local_experts=None, num_experts=2), "num_experts_per_tok (3) exceeds num_experts (2)"),
        (tiny_qwen3, dict(num_local_experts=None), "Qwen3MoeForCausalLM needs the key 'num_experts'"),
        (tiny_qwen3, dict(mlp_only_layers=[3]),
         "mlp_only_layers must be a list of layer indices below num_hidden_layers (3), got [3]"),
        (tiny_qwen3, dict(decoder_sparse_step=0), "decoder_sparse_step must be a positive integer, got 0"),
        (tiny_qwen3, dict(moe_intermediate_size=None), "Qwen3MoeForCausalLM needs the key 'moe_intermediate_size'"),
    ]
    for base, changes, message in cases:
        path = write_config(tmp_path, base, **changes)
        assert config_error(path, no_weights_read) == f"{path / 'config.json'}: {message}", changes


def test_config_not_an_object_or_not_json(tmp_path, no_weights_read):
    f = tmp_path / "config.json"
    f.write_text("[1, 2]")
    assert config_error(tmp_path, no_weights_read) == f"{f} must hold a JSON object, got a list"
    f.write_text('{"architectures": ["MixtralForCausalLM"],')
    assert config_error(tmp_path, no_weights_read) == \
        f"{f} is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 42 (char 41)"
    f.write_bytes(b"\xff\xfe{}")
    assert config_error(tmp_path, no_weights_read).startswith(f"{f} is not valid JSON: ")


def test_published_configs_still_read(tmp_path):
    """The shipped checkpoints' configs (nulls where published configs have them) read as before."""
    for name, experts, k in [("tiny", 8, 2), ("tiny-deepseek", 32, 6), ("tiny-lpr", 8, 2)]:
        cfg = tinymoe.config.load_config(tinymoe.weights.resolve(name))
        assert (cfg.num_experts, cfg.top_k, cfg.rope_scaling, cfg.head_dim) == (experts, k, None, 32)


# --- rope_scaling ----------------------------------------------------------------------------

SUPPORTED = "supported: default, linear, yarn"
ROPE_BAD = [
    ({"type": "dynamic", "factor": 2.0}, "rope_scaling type 'dynamic' is not supported (its frequencies change "
     f"with the sequence length, which the paged KV cache cannot follow); {SUPPORTED}"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]},
     f"rope_scaling type 'longrope' is not supported; {SUPPORTED}"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
     f"rope_scaling type 'llama3' is not supported; {SUPPORTED}"),
    ({"rope_type": "su"}, f"rope_scaling type 'su' is not supported; {SUPPORTED}"),
    ({"type": "linear"}, "rope_scaling (linear) needs 'factor'"),
    ({"type": "linear", "factor": 0.5}, "rope_scaling factor must be at least 1, got 0.5"),
    ({"type": "linear", "factor": "2"}, "rope_scaling factor must be a positive number, got '2'"),
    ({"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5},
     "rope_scaling (yarn) has unknown key 'partial_rotary_factor'; known: attention_factor, beta_fast, beta_slow, "
     "factor, mscale, mscale_all_dim, original_max_position_embeddings, rope_theta, truncate"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8.5},
     "rope_scaling original_max_position_embeddings must be a positive integer, got 8.5"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 1, "beta_slow": 2},
     "rope_scaling beta_fast (1) is smaller than beta_slow (2)"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": "yes"}, "rope_scaling truncate must be true or false, got 'yes'"),
]


@pytest.mark.parametrize("scaling,message", ROPE_BAD, ids=[m[:40] for _, m in ROPE_BAD])
def test_rope_scaling_refused(tmp_path, tiny_qwen3, no_weights_read, scaling, message):
    path = write_config(tmp_path, tiny_qwen3, rope_scaling=scaling)
    assert config_error(path, no_weights_read) == f"{path / 'config.json'}: {message}"


def test_rope_parameters_spelling_refused_too(tmp_path, tiny_deepseek, no_weights_read):
    path = write_config(tmp_path, tiny_deepseek, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    assert config_error(path, no_weights_read).startswith(
        f"{path / 'config.json'}: rope_parameters type 'dynamic' is not supported")


def test_yarn_frequencies_match_transformers_at_qwen3_scale():
    """Qwen3-30B-A3B's documented YaRN setting (head_dim 128, theta 1e6, 32768 -> 4x): the ramp runs
    over many pairs here, unlike in the tiny checkpoints."""
    from transformers import Qwen3MoeConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from tinymoe.config import ModelConfig
    from tinymoe.kernels.rotary import rope_frequencies
    for extra in [{}, {"beta_fast": 16, "beta_slow": 2, "truncate": False}, {"mscale": 1.0, "mscale_all_dim": 0.7}]:
        scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, **extra}
        hf = Qwen3MoeConfig(head_dim=128, rope_parameters={**scaling, "rope_theta": 1e6},
                            max_position_embeddings=131072)
        ref_freq, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](hf)
        ours = ModelConfig.from_dict({"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 8, "hidden_size": 8,
                                      "num_hidden_layers": 1, "num_attention_heads": 1, "head_dim": 128,
                                      "intermediate_size": 8, "moe_intermediate_size": 8, "num_experts": 2,
                                      "num_experts_per_tok": 1, "max_position_embeddings": 40960,
                                      "rope_theta": 1e6, "rope_scaling": scaling})
        assert ours.max_position == 131072
        freq, scale = rope_frequencies(128, ours.rope_theta, ours.rope_scaling)
        assert ((freq - ref_freq).abs() / ref_freq).max() < 1e-6, extra
        assert scale == pytest.approx(ref_scale, rel=1e-12)
        ramp = (freq / (1.0 / 1e6 ** (torch.arange(0, 128, 2) / 128))).log() / -torch.tensor(4.0).log()
        assert ((ramp > 0.01) & (ramp < 0.99)).sum() >= 4  # pairs blended between kept and interpolated


# --- calibration files -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixtral_calib(tiny_mixtral, tmp_path_factory):
    model = tinymoe.load_model(tiny_mixtral)
    tokens = torch.randint(0, 96, (512,), generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("calib") / "mixtral.safetensors"
    calibrate(model, tokens, seq_len=64, proto_steps=20).save(path)
    return path


def refused(model, calib) -> str:
    """The one-line refusal of install(model, "prototype", calib), checking no block was touched."""
    routers = [block.router for block in model.moe_blocks()]
    with pytest.raises(ValueError) as e:
        install(model, "prototype", calib)
    assert [block.router for block in model.moe_blocks()] == routers  # nothing installed
    return one_line(e)


def test_calibration_from_another_architecture(mixtral_calib, tiny_deepseek):
    assert refused(tinymoe.load_model(tiny_deepseek), mixtral_calib) == \
        f"{mixtral_calib} was made for another model: architecture is mixtral there, deepseek_moe here"


def test_calibration_each_recorded_field(mixtral_calib, tiny_mixtral):
    model = tinymoe.load_model(tiny_mixtral)
    install(model, "prototype", mixtral_calib)  # its own model: accepted
    base = load_calibration(mixtral_calib)
    for key, value, here in [("num_layers", 4, 3), ("num_experts", 8, 6), ("top_k", 3, 2), ("hidden_size", 64, 48),
                             ("moe_layers", [0, 1], [0, 1, 2])]:
        meta = json.loads(json.dumps(base.meta))
        meta["model"][key] = value
        calib = Calibration(base.layers, meta, "calib.safetensors")
        assert refused(model, calib) == f"calib.safetensors was made for another model: {key} is {value} there, " \
                                        f"{here} here"


def test_calibration_from_same_shaped_model_with_other_gates(mixtral_calib, tmp_path):
    other = tinymoe.load_model(checkpoints.mixtral(tmp_path, seed=11))  # same config, other weights
    assert refused(other, mixtral_calib) == \
        f"{mixtral_calib} was made for another model: the gate weights of layer 0 differ (gate_fingerprint)"


def test_calibration_survives_a_change_of_dtype(mixtral_calib, tiny_mixtral):
    """Made in float32, used on the same checkpoint in bf16 and fp16: the fingerprint still matches."""
    for dtype in ("bf16", "fp16"):
        model = tinymoe.load_model(tiny_mixtral, dtype=dtype)
        install(model, "laser", mixtral_calib)
        assert all(type(block.router).__name__ == "Laser" for block in model.moe_blocks())


def test_weights_file_or_old_file_as_calibration(mixtral_calib, tiny_mixtral, tmp_path):
    model = tinymoe.load_model(tiny_mixtral)
    weights = tiny_mixtral / "model.safetensors"
    assert refused(model, weights) == f"{weights} is not a tinymoe calibration file (no calibration metadata)"
    old = load_calibration(mixtral_calib)
    del old.meta["model"]
    old.save(tmp_path / "old.safetensors")
    assert refused(model, tmp_path / "old.safetensors") == (
        f"{tmp_path / 'old.safetensors'} does not record which model it was made from (an older tinymoe wrote "
        "it); rerun `tinymoe calibrate`")
    (tmp_path / "text.safetensors").write_text("hello")
    assert refused(model, tmp_path / "text.safetensors") == \
        f"cannot read calibration file {tmp_path / 'text.safetensors'}: " \
        "Error while deserializing header: header too small"


# --- output paths of the CLI -----------------------------------------------------------------

def run_without_loading(monkeypatch, *args):
    import tinymoe.cli as cli_module
    monkeypatch.setattr(cli_module, "_load", lambda *a: pytest.fail("the model was loaded"))
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_calibrate_out_into_a_missing_folder(tmp_path, monkeypatch):
    data = tmp_path / "data.txt"
    data.write_text("some text")
    result = run_without_loading(monkeypatch, "calibrate", "tiny", "--data", data,
                                 "--out", tmp_path / "nope" / "calib.safetensors")
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == \
        f"Error: Invalid value for '--out': folder {tmp_path / 'nope'} does not exist (create it first)"
    result = run_without_loading(monkeypatch, "calibrate", "tiny", "--data", data, "--out", data / "calib.safetensors")
    assert result.output.splitlines()[-1] == f"Error: Invalid value for '--out': {data} is not a folder"
    result = run_without_loading(monkeypatch, "calibrate", "tiny", "--data", data, "--out", tmp_path / "c",
                                 "--seq-len", 0)
    assert result.output.splitlines()[-1] == \
        "Error: Invalid value for '--seq-len': 0 is not in the range x>=1."


def test_bench_plot_path_checked_first(tmp_path, monkeypatch):
    result = run_without_loading(monkeypatch, "bench", "tiny", "--plot", tmp_path / "nope" / "heat.png")
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == \
        f"Error: Invalid value for '--plot': folder {tmp_path / 'nope'} does not exist (create it first)"
    result = run_without_loading(monkeypatch, "bench", "tiny", "--plot", tmp_path / "heat.xyz")
    assert result.output.splitlines()[-1].startswith(
        "Error: Invalid value for '--plot': cannot write a .xyz image; use one of ")
    assert "png" in result.output


def test_eval_reads_calib_before_the_weights_and_checks_it_before_evaluating(mixtral_calib, tiny_deepseek,
                                                                           tiny_mixtral, tmp_path, monkeypatch):
    import tinymoe.evaluation
    data = tmp_path / "data.txt"
    data.write_text("some text " * 50)
    weights = tiny_mixtral / "model.safetensors"
    result = run_without_loading(monkeypatch, "eval", "tiny", "--router", "laser", "--calib", weights, "--data", data)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {weights} is not a tinymoe calibration file (no calibration metadata)\n"
    import tinymoe.cli as cli_module
    monkeypatch.setattr(cli_module, "_load", lambda model, dtype: (tinymoe.load_model(model, dtype=dtype), None))
    monkeypatch.setattr(tinymoe.evaluation, "evaluate_text", lambda *a, **k: pytest.fail("evaluation started"))
    result = CliRunner().invoke(cli, ["eval", str(tiny_deepseek), "--router", "prototype", "--calib",
                                      str(mixtral_calib), "--data", str(data)])
    assert result.exit_code == 1
    assert result.stderr == \
        f"Error: {mixtral_calib} was made for another model: architecture is mixtral there, deepseek_moe here\n"


def test_llm_refuses_another_models_calibration_before_loading(mixtral_calib, tiny_deepseek, monkeypatch):
    monkeypatch.setattr(loader.Checkpoint, "__init__", lambda *a: pytest.fail("the weights were opened"))
    with pytest.raises(ValueError) as e:
        tinymoe.LLM(tiny_deepseek, router="prototype", calib=mixtral_calib)
    assert one_line(e) == f"{mixtral_calib} was made for another model: architecture is mixtral there, deepseek_moe here"
