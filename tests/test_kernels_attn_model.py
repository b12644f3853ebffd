"""The whole model on the Triton backend (Triton's interpreter on CPU) gives the torch backend's
logits: a full causal forward (RMSNorm with fused residual, rotary, the MoE experts) and a
token-by-token decode of two sequences through a paged KV cache (store_kv, paged attention)."""
import pytest
import torch

import tinymoe
from tinymoe import kernels
from tinymoe.kernels import backend


class DecodeCache:
    """A paged KV cache for steps where every packed row is one new token of its own sequence."""

    def __init__(self, cfg, num_blocks: int, block_size: int):
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k, self.v = torch.zeros(shape), torch.zeros(shape)
        self.block_size, self.scale = block_size, cfg.head_dim ** -0.5

    def step(self, tables: torch.Tensor, positions: torch.Tensor):
        self.tables, self.lens = tables, (positions + 1).int()
        self.slots = tables[torch.arange(len(tables)), positions // self.block_size].long() * self.block_size \
            + positions % self.block_size

    def attend(self, layer, q, k, v):
        kernels.store_kv(k, v, self.k[layer], self.v[layer], self.slots)
        return kernels.paged_attention_decode(q, self.k[layer], self.v[layer], self.tables, self.lens, self.scale)


def decode(model, sequences, block_size=2):
    """Logits of every position of every sequence, fed one token per step, all sequences batched."""
    longest = max(map(len, sequences))
    per_seq = -(-longest // block_size)
    cache = DecodeCache(model.config, per_seq * len(sequences), block_size)
    tables = torch.randperm(per_seq * len(sequences), generator=torch.Generator().manual_seed(1))
    tables = tables.view(len(sequences), per_seq).int()  # scattered blocks
    logits = [[] for _ in sequences]
    for t in range(longest):
        rows = [i for i, s in enumerate(sequences) if t < len(s)]
        positions = torch.full((len(rows),), t)
        cache.step(tables[rows], positions)
        ids = torch.tensor([sequences[i][t] for i in rows])[None]
        out = model(ids, positions[None], cache)[0]
        for row, i in enumerate(rows):
            logits[i].append(out[row])
    return [torch.stack(rows) for rows in logits]


@pytest.fixture(params=["mixtral", "qwen3"])  # Qwen3 adds per-head q/k RMSNorm
def model(request):
    return tinymoe.load_model(request.getfixturevalue(f"tiny_{request.param}"), dtype="float32")


def test_triton_backend_model_matches_torch(model):
    assert backend.INTERPRETING, "Triton's interpreter is off: set TRITON_INTERPRET=1 before triton is imported"
    torch.manual_seed(0)
    V = model.config.vocab_size
    sequences = [torch.randint(0, V, (n,)).tolist() for n in (5, 3)]
    with torch.inference_mode():
        with kernels.use_backend("torch"):
            full = [model(torch.tensor(s)[None])[0] for s in sequences]
            stepped = decode(model, sequences)
        with kernels.use_backend("triton"):
            full_triton = model(torch.tensor(sequences[0])[None])[0]
            stepped_triton = decode(model, sequences)
    torch.testing.assert_close(full_triton, full[0], rtol=1e-5, atol=1e-5)
    for ref, torch_out, triton_out in zip(full, stepped, stepped_triton):
        torch.testing.assert_close(torch_out, ref, rtol=1e-5, atol=1e-5)  # the harness is a real decode
        torch.testing.assert_close(triton_out, torch_out, rtol=1e-5, atol=1e-5)
