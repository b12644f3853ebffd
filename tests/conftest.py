import os
import sys
from pathlib import Path

import pytest
import torch

# Triton decides compiler or interpreter when a kernel is defined: make it the interpreter (no GPU).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tiny shapes everywhere: OpenMP's thread handoffs cost more than they save, far more on a busy machine.
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))
import checkpoints  # noqa: E402


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory):
    return checkpoints.mixtral(tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    return checkpoints.qwen3_moe(tmp_path_factory.mktemp("qwen3"), shard=True)


@pytest.fixture(scope="session")
def tiny_deepseek(tmp_path_factory):
    return checkpoints.deepseek_moe(tmp_path_factory.mktemp("deepseek"))


@pytest.fixture(scope="session", params=["mixtral", "qwen3", "deepseek"])
def tiny_checkpoint(request, tiny_mixtral, tiny_qwen3, tiny_deepseek):
    """Each family's tiny checkpoint in turn."""
    return {"mixtral": tiny_mixtral, "qwen3": tiny_qwen3, "deepseek": tiny_deepseek}[request.param]


@pytest.fixture(params=[False, True], ids=["native-any-rows", "torch-gemm-over-16-rows"])
def bf16_cpu(request):
    """Both row rules, forced whatever this CPU has: False = the native kernels take any number of
    rows (as on AVX2, or anywhere with batch invariance on, the default); True = a CPU with bf16
    instructions and batch invariance off, whose batches over 16 rows go to torch's GEMM (as with
    AVX512-BF16 or AMX). tests/test_batch_invariance.py covers bf16 instructions with it on."""
    from tinymoe import settings
    from tinymoe.kernels import cpu_linear
    with cpu_linear.bf16_instructions(request.param), settings.override(batch_invariant=not request.param):
        yield request.param


@pytest.fixture
def restored():
    """Whatever a test installs, the engine settings and torch's threads are put back after it."""
    from tinymoe import settings
    before, threads = settings.current(), torch.get_num_threads()
    yield
    settings.install(before)
    torch.set_num_threads(threads)
