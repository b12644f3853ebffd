"""The whole model on the Triton backend (Triton's interpreter on CPU) gives the torch backend's
logits: a full causal forward (RMSNorm with fused residual, rotary, the MoE experts) and two
sequences run through a paged KV cache (store_kv; prefill chunks over a cached prefix, then
batched token-by-token decode)."""
import pytest
import torch

import tinymoe
from tinymoe import kernels
from tinymoe.kernels import backend


class PagedCache:
    """A paged KV cache with two kinds of step: one sequence's chunk of new tokens (prefill), or
    one new token for each of several sequences (decode)."""

    def __init__(self, cfg, num_blocks: int, block_size: int):
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k, self.v = torch.zeros(shape), torch.zeros(shape)
        self.block_size, self.scale = block_size, cfg.head_dim ** -0.5

    def step(self, tables: torch.Tensor, positions: torch.Tensor, prefill: bool):
        """tables [S, max_blocks]; positions [N] of the new tokens (prefill: S = 1)."""
        rows = torch.zeros_like(positions) if prefill else torch.arange(len(positions))
        self.slots = tables[rows, positions // self.block_size].long() * self.block_size + positions % self.block_size
        self.tables, self.prefill = tables, prefill
        self.lens = (positions[-1:] if prefill else positions).int() + 1

    def attend(self, layer, q, k, v):
        kc, vc = self.k[layer], self.v[layer]
        kernels.store_kv(k, v, kc, vc, self.slots)
        if self.prefill:
            return kernels.paged_attention_prefill(q, kc, vc, self.tables[0], int(self.lens), self.scale)
        return kernels.paged_attention_decode(q, kc, vc, self.tables, self.lens, self.scale)


def paged_run(model, sequences, chunks, block_size=2):
    """Logits of every position of every sequence: two prefill chunks of `chunks` tokens each (the
    second over a cached prefix), then one token per step with all sequences batched."""
    longest = max(map(len, sequences))
    per_seq = -(-longest // block_size)
    cache = PagedCache(model.config, per_seq * len(sequences), block_size)
    tables = torch.randperm(per_seq * len(sequences), generator=torch.Generator().manual_seed(1))
    tables = tables.view(len(sequences), per_seq).int()  # scattered blocks
    logits = []
    for i, seq in enumerate(sequences):
        parts = []
        for lo in range(0, 2 * chunks, chunks):
            positions = torch.arange(lo, lo + chunks)
            cache.step(tables[i:i + 1], positions, prefill=True)
            parts.append(model(torch.tensor(seq[lo:lo + chunks])[None], positions[None], cache)[0])
        logits.append(parts)
    for t in range(2 * chunks, longest):
        rows = [i for i, s in enumerate(sequences) if t < len(s)]
        positions = torch.full((len(rows),), t)
        cache.step(tables[rows], positions, prefill=False)
        out = model(torch.tensor([sequences[i][t] for i in rows])[None], positions[None], cache)[0]
        for row, i in enumerate(rows):
            logits[i].append(out[row:row + 1])
    return [torch.cat(parts) for parts in logits]


@pytest.fixture(params=["mixtral", "qwen3"])  # Qwen3 adds per-head q/k RMSNorm
def model(request):
    return tinymoe.load_model(request.getfixturevalue(f"tiny_{request.param}"), dtype="float32")


def test_triton_backend_model_matches_torch(model):
    assert backend.interpreting(), "Triton's interpreter is off: set TRITON_INTERPRET=1 before triton is imported"
    torch.manual_seed(0)
    V = model.config.vocab_size
    sequences = [torch.randint(0, V, (n,)).tolist() for n in (7, 5)]
    with torch.inference_mode():
        with kernels.use_backend("torch"):
            full = [model(torch.tensor(s)[None])[0] for s in sequences]
            stepped = paged_run(model, sequences, chunks=2)
        with kernels.use_backend("triton"):
            full_triton = model(torch.tensor(sequences[0])[None])[0]
            stepped_triton = paged_run(model, sequences, chunks=2)
    torch.testing.assert_close(full_triton, full[0], rtol=1e-5, atol=1e-5)
    for ref, torch_out, triton_out in zip(full, stepped, stepped_triton):
        torch.testing.assert_close(torch_out, ref, rtol=1e-5, atol=1e-5)  # the paged run is exact
        torch.testing.assert_close(triton_out, torch_out, rtol=1e-5, atol=1e-5)
