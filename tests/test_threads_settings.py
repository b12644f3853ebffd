"""Threads and the OpenMP wait policy: the TINYMOE_THREADS / TINYMOE_WAIT_POLICY variables, the
`--threads` / `--wait-policy` group options, and the OMP_WAIT_POLICY the `tinymoe` entry point
exports before torch loads libgomp (a variable the user set wins)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tinymoe import Settings, settings
from tinymoe.cli import cli
from tinymoe.settings import omp_environment

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", " 2", "²"])
def test_bad_threads_variable(value):
    with pytest.raises(ValueError) as e:
        Settings.from_env({"TINYMOE_THREADS": value})
    assert str(e.value) == (f"TINYMOE_THREADS={value!r}: use a positive integer (or leave it unset: the cores other "
                            "work leaves free)")


@pytest.mark.parametrize("value", ["Passive", "spinning", "0"])
def test_bad_wait_policy_variable(value):
    with pytest.raises(ValueError) as e:
        Settings.from_env({"TINYMOE_WAIT_POLICY": value})
    assert str(e.value) == f"TINYMOE_WAIT_POLICY={value!r}: use passive, spin (the default) or active"


def test_variables_and_fields():
    assert Settings().wait_policy == "spin" and Settings().threads is None
    got = Settings.from_env({"TINYMOE_THREADS": "3", "TINYMOE_WAIT_POLICY": "active"})
    assert got == Settings(threads=3, wait_policy="active")
    assert Settings.from_env({"TINYMOE_THREADS": "", "TINYMOE_WAIT_POLICY": ""}) == Settings()
    with pytest.raises(ValueError) as e:
        Settings(wait_policy="sleep")
    assert str(e.value) == "Settings.wait_policy takes 'passive', 'spin' or 'active', not 'sleep'"


def test_omp_environment():
    assert omp_environment("passive", {}) == {"OMP_WAIT_POLICY": "passive"}
    assert omp_environment("spin", {}) == {"GOMP_SPINCOUNT": "10000"}
    assert omp_environment("spin", {"GOMP_SPINCOUNT": "300"}) == {}
    assert omp_environment("active", {"OMP_WAIT_POLICY": ""}) == {"OMP_WAIT_POLICY": "active"}
    assert omp_environment("passive", {"OMP_WAIT_POLICY": "active"}) == {}  # the user's choice wins
    assert omp_environment("passive", {"GOMP_SPINCOUNT": "1000"}) == {}
    with pytest.raises(ValueError) as e:
        omp_environment("busy", {})
    assert str(e.value) == "Settings.wait_policy takes 'passive', 'spin' or 'active', not 'busy'"


def test_group_options_install(restored):
    result = CliRunner().invoke(cli, ["--threads", "1", "--wait-policy", "active", "models"],
                                env={"TINYMOE_THREADS": "2"})
    assert result.exit_code == 0, result.output
    assert settings.current() == Settings(threads=1, wait_policy="active") and torch.get_num_threads() == 1
    result = CliRunner().invoke(cli, ["--threads", "0", "models"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == "Error: Invalid value for '--threads': 0 is not in the range x>=1."


ENTRY = r"""
import os, sys
class Watch:  # records the policy in the environment when torch (and so libgomp) is first imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not hasattr(self, "seen"):
            self.seen = os.environ.get("OMP_WAIT_POLICY", "-") + "/" + os.environ.get("GOMP_SPINCOUNT", "-")
            print("AT_TORCH_IMPORT", self.seen, flush=True)
        return None
sys.meta_path.insert(0, Watch())
sys.argv = ["tinymoe", *sys.argv[1:]]
from tinymoe.cli import main
main()
"""


@pytest.mark.parametrize("user, argv, seen", [
    ({}, ["--threads", "1", "--wait-policy", "active", "models"], "active/-"),
    ({}, ["--threads", "1", "--wait-policy", "passive", "models"], "passive/-"),
    ({}, ["--threads", "1", "models"], "-/10000"),
    ({"OMP_WAIT_POLICY": "active"}, ["--wait-policy", "passive", "models"], "active/-"),  # the user's wins
    ({"GOMP_SPINCOUNT": "5"}, ["models"], "-/5"),
])
def test_entry_point_sets_the_policy_before_torch(user, argv, seen):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") and not k.startswith("TINYMOE_")}
    done = subprocess.run([sys.executable, "-c", ENTRY, *argv], env={**env, **user, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("AT_TORCH_IMPORT ")] == [seen]
    assert any(line.startswith("tiny ") for line in lines)  # the command ran


@pytest.mark.parametrize("value", ["AVX2", "avx512bf16", "0"])
def test_bad_native_isa(value):
    with pytest.raises(ValueError) as e:
        Settings.from_env({"TINYMOE_NATIVE_ISA": value})
    assert str(e.value) == (f"TINYMOE_NATIVE_ISA={value!r}: use native (this CPU's instructions, the default), "
                            "avx512 (no AVX512-BF16) or avx2 (the AVX2 code only)")
    with pytest.raises(ValueError) as e:
        Settings(native_isa=value)
    assert str(e.value) == f"Settings.native_isa takes 'native', 'avx512' or 'avx2', not {value!r}"


def test_native_isa_variable():
    assert Settings().native_isa == "native"
    assert Settings.from_env({"TINYMOE_NATIVE_ISA": "avx2"}) == Settings(native_isa="avx2")
    assert Settings.from_env({"TINYMOE_NATIVE_ISA": "avx512"}) == Settings(native_isa="avx512")
    assert Settings.from_env({"TINYMOE_NATIVE_ISA": ""}) == Settings()
