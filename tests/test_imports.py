"""No import-time side effects, and the engine-wide settings: importing tinymoe changes no
environment variable and loads neither triton nor the native library (checked in a fresh
process without TRITON_INTERPRET); each bad TINYMOE_* value or Settings field is a one-line
error; LLM takes router options as a dict, so a mistyped engine keyword is a TypeError."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tinymoe
from tinymoe import LLM, Settings, settings

ROOT = Path(__file__).resolve().parents[1]
TRITON_ON_CPU = ("the Triton backend runs CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
                 "before triton is first imported")

FRESH = r"""
import json, os, sys
before = dict(os.environ)
import tinymoe
from tinymoe import LLM, load_model
import tinymoe.kernels, tinymoe.engine, tinymoe.cli
from tinymoe.kernels import native
with open("/proc/self/maps") as f:
    mapped = "tinymoe_cpu-" in f.read()
report = {"env_changed": sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)),
          "triton": sorted(m for m in sys.modules if m == "triton" or m.startswith("triton.")),
          "native_loads": native.native.cache_info().currsize, "native_mapped": mapped}
import torch
with tinymoe.kernels.use_backend("triton"):
    try:
        tinymoe.kernels.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6)
        report["forced_triton"] = None
    except RuntimeError as e:
        report["forced_triton"] = str(e)
print(json.dumps(report))
"""


def fresh_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("TINYMOE_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_import_has_no_side_effects():
    done = subprocess.run([sys.executable, "-c", FRESH], env=fresh_env(), capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["env_changed"] == []
    assert report["triton"] == []
    assert report["native_loads"] == 0 and not report["native_mapped"]
    # a forced Triton backend on CPU without the interpreter: one line saying what to do
    assert report["forced_triton"] == TRITON_ON_CPU


BAD_ENV = [
    ("TINYMOE_BACKEND", "gpu", "TINYMOE_BACKEND='gpu': use triton, torch or auto (or leave it unset: auto)"),
    ("TINYMOE_NATIVE", "yes", "TINYMOE_NATIVE='yes': use 0 (torch ops only) or 1 (the native CPU library, the "
                              "default)"),
    ("TINYMOE_NATIVE_STEP", "off", "TINYMOE_NATIVE_STEP='off': use 0 (the per-op decode path) or 1 (the one-call "
                                   "decode step, the default)"),
    ("TINYMOE_CACHE", "", "TINYMOE_CACHE is empty: give the native library's build folder or leave it unset "
                          "(~/.cache/tinymoe)"),
    ("TINYMOE_CACHE", __file__, f"TINYMOE_CACHE={__file__!r} is not a folder"),
    ("TINYMOE_CPU_BF16", "2", "TINYMOE_CPU_BF16='2': use 0 (no bf16 instructions), 1 (bf16 instructions) or leave "
                              "it unset (detect)"),
    ("TINYMOE_THREADS", "0", "TINYMOE_THREADS='0': use a positive integer (or leave it unset: the cores other work "
                             "leaves free)"),
    ("TINYMOE_WAIT_POLICY", "spinning", "TINYMOE_WAIT_POLICY='spinning': use passive, spin (the default) or active"),
]


@pytest.mark.parametrize("var, value, message", BAD_ENV, ids=[f"{v}={x!r}" for v, x, _ in BAD_ENV])
def test_bad_env_value_is_one_line(var, value, message):
    with pytest.raises(ValueError) as e:
        Settings.from_env({var: value})
    assert str(e.value) == message


def test_env_values():
    assert Settings.from_env({}) == Settings()
    got = Settings.from_env({"TINYMOE_BACKEND": "torch", "TINYMOE_NATIVE": "0", "TINYMOE_NATIVE_STEP": "0",
                             "TINYMOE_CACHE": "/tmp/tm", "TINYMOE_CPU_BF16": "1"})
    assert got == Settings(backend="torch", native=False, native_step=False, cache_dir=Path("/tmp/tm"), cpu_bf16=True)
    assert Settings.from_env({"TINYMOE_BACKEND": "", "TINYMOE_NATIVE": ""}) == Settings()  # empty: the default


def test_bad_env_fails_before_loading(monkeypatch, restored):
    monkeypatch.setenv("TINYMOE_BACKEND", "gpu")
    monkeypatch.setattr(settings, "_installed", None)  # as in a fresh process: built on first use
    with pytest.raises(ValueError) as e:
        LLM("no/such/model")  # the settings are read before the (missing) checkpoint
    assert str(e.value) == BAD_ENV[0][2]


def test_the_cli_installs_the_environment(monkeypatch, restored):
    from click.testing import CliRunner
    from tinymoe.cli import cli
    result = CliRunner().invoke(cli, ["models"], env={"TINYMOE_NATIVE_STEP": "2"})
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: TINYMOE_NATIVE_STEP='2': use 0 (the per-op decode path) or 1 (the one-call decode step, the default)"]
    result = CliRunner().invoke(cli, ["models"], env={"TINYMOE_BACKEND": "torch", "TINYMOE_NATIVE_STEP": "0"})
    assert result.exit_code == 0, result.output
    assert settings.current() == Settings(backend="torch", native_step=False)


BAD_FIELDS = [
    ({"backend": "cuda"}, ValueError, "unknown kernel backend 'cuda'; valid: triton, torch, auto"),
    ({"native": 1}, TypeError, "Settings.native takes True or False, not 1"),
    ({"native_step": "0"}, TypeError, "Settings.native_step takes True or False, not '0'"),
    ({"cpu_bf16": 0}, TypeError, "Settings.cpu_bf16 takes True, False or None, not 0"),
    ({"cache_dir": None}, TypeError, "Settings.cache_dir takes a folder path, not None"),
    ({"threads": 0}, ValueError, "Settings.threads takes a positive integer or None, not 0"),
    ({"wait_policy": None}, ValueError, "Settings.wait_policy takes 'passive', 'spin' or 'active', not None"),
    ({"kv_cache_bytes": 1.5}, ValueError, "Settings.kv_cache_bytes takes a positive integer, not 1.5"),
]


@pytest.mark.parametrize("fields, kind, message", BAD_FIELDS, ids=[next(iter(f)) for f, _, _ in BAD_FIELDS])
def test_bad_settings_field_is_one_line(fields, kind, message):
    with pytest.raises(kind) as e:
        Settings(**fields)
    assert str(e.value) == message


def test_install_and_override(restored):
    with pytest.raises(TypeError) as e:
        settings.install({"backend": "torch"})
    assert str(e.value) == "install takes a tinymoe.Settings, not dict"
    with pytest.raises(TypeError) as e:
        settings.override(backnd="torch")
    assert str(e.value) == "Settings has no field backnd"
    base = settings.current()
    with settings.override(native_step=False):
        with tinymoe.kernels.use_backend("torch"):
            assert settings.current() == dataclasses.replace(base, native_step=False, backend="torch")
        assert settings.current() == dataclasses.replace(base, native_step=False)
    assert settings.current() == base
    threads = torch.get_num_threads()
    with settings.override(threads=threads + 1):  # threads are set on install, and put back
        assert torch.get_num_threads() == threads + 1
    assert torch.get_num_threads() == threads
    settings.install(dataclasses.replace(base, threads=2))
    assert torch.get_num_threads() == 2


def test_mistyped_engine_keyword_is_a_type_error():
    with pytest.raises(TypeError) as e:
        LLM("tiny", max_num_seq=4)
    assert str(e.value) == "LLM.__init__() got an unexpected keyword argument 'max_num_seq'"
    with pytest.raises(TypeError) as e:
        LLM("tiny", router="laser", router_opts=[("t_fix", 0.3)])
    assert str(e.value) == "router_opts takes a dict of router options, not list"


def test_router_opts_and_settings_reach_their_places(tiny_mixtral, restored):
    model = tinymoe.load_model(tiny_mixtral)
    with pytest.raises(ValueError, match=r"^router 'topk' has no option max_num_seqs"):
        LLM(model, router_opts={"max_num_seqs": 4})  # a router option the router does not have
    llm = LLM(model, router="laser", router_opts={"t_fix": 0.25})
    assert {type(b.router).__name__ for b in model.moe_blocks()} == {"Laser"}
    assert {b.router.t_fix for b in model.moe_blocks()} == {0.25}
    # KV budget: 3 layers x 2 KV heads x head_dim 8 x (k, v) x 4 bytes = 384 bytes a token
    llm = LLM(model, settings=Settings(kv_cache_bytes=384 * 2048))
    assert len(llm.blocks.blocks) == 2048 // 16 and settings.current().kv_cache_bytes == 384 * 2048
    assert len(LLM(model, settings=Settings()).blocks.blocks) == 64 * 512 // 16  # default: capped by the context
