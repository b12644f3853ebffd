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
