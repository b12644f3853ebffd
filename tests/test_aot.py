"""The ahead-of-time compiler builds real sm_80 PTX and cubins with no GPU, from a process whose
environment has no TRITON_INTERPRET (as `make aot` runs it). The full set is CI's `make aot`."""
import os
import re
import subprocess
import sys

import pytest


# decode: the split-slice variants; varlen prefill: its per-program sequence search (a while loop)
@pytest.mark.parametrize("kernel", ["paged_attention_decode_bf16_g4", "paged_attention_prefill_varlen_bf16_g4"])
def test_aot_compiles_paged_attention_for_sm80(kernel):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tinymoe.kernels.aot", "--arch", "80", "--only", kernel],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    line = re.search(rf"^{kernel}\S*\s+sm_80\s+ok\s+ptx\s+([\d.]+) KiB\s+cubin\s+([\d.]+) KiB",
                     done.stdout, re.M)
    assert line, done.stdout
    assert float(line[1]) > 1 and float(line[2]) > 1  # real PTX text and a real cubin


def test_aot_fails_when_nothing_matches():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-m", "tinymoe.kernels.aot", "--arch", "80", "--only", "no-such-kernel"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "no kernel matches" in done.stderr


def test_aot_reports_each_failure_and_exits_nonzero(monkeypatch, capsys):
    from tinymoe.kernels import aot

    def compile_one(fn, signature, constexprs, arch):
        if fn == "broken":
            raise RuntimeError("ptxas error\nout of registers")
        return type("Compiled", (), {"asm": {"ptx": "x" * 2048, "cubin": b"y" * 4096}})()

    monkeypatch.setattr(aot, "interpreting", lambda: False)
    monkeypatch.setattr(aot, "collect", lambda only: [("fine", "fine", {}, {}), ("bad", "broken", {}, {})])
    monkeypatch.setattr(aot, "compile_one", compile_one)
    assert aot.main(["--arch", "80,90"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines[:4]] == [["fine", "sm_80", "ok"], ["fine", "sm_90", "ok"],
                                                        ["bad", "sm_80", "FAIL"], ["bad", "sm_90", "FAIL"]]
    assert "out of registers" in lines[2] and lines[4] == "2/4 compiled"


def test_every_module_with_triton_kernels_is_listed():
    from pathlib import Path

    from tinymoe.kernels import aot
    folder = Path(aot.__file__).parent
    declaring = sorted(p.stem for p in folder.glob("*.py") if re.search(r"^AOT_KERNELS = ", p.read_text(), re.M))
    assert declaring == sorted(aot.TRITON_MODULES)
