from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels
from ..models.native_decode import decode_step
from .scheduler import Batch
from .sequence import Sequence


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One whole sequence: q [n, H, hd], k/v [n, KV, hd]."""
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                          is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1)


@dataclass
class StepLayout:
    """Where this step's packed tokens go in the cache and what each one attends to."""
    slot_mapping: torch.Tensor           # [N]
    decode_rows: torch.Tensor | None     # rows with one new token (None: every row)
    block_tables: torch.Tensor | None    # [D, max_blocks] for those rows
    context_lens: torch.Tensor | None    # [D]
    prefills: list[tuple[int, int, int, torch.Tensor]]  # (first row, end row, context_len, block table)


class PagedKVCache:
    """The per-layer K/V block pools, and the `attend` the model calls (docs/DESIGN.md)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        # Zeroed: padding slots are read (and masked), and garbage there could be NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.scale = head_dim ** -0.5
        self.layout: StepLayout | None = None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, kc, vc = self.layout, self.k[layer], self.v[layer]
        kernels.store_kv(k, v, kc, vc, s.slot_mapping)
        if not s.prefills:
            return kernels.paged_attention_decode(q, kc, vc, s.block_tables, s.context_lens, self.scale)
        out = torch.empty_like(q)
        if s.decode_rows is not None:
            out[s.decode_rows] = kernels.paged_attention_decode(q[s.decode_rows], kc, vc, s.block_tables,
                                                                s.context_lens, self.scale)
        for lo, hi, context_len, table in s.prefills:
            if context_len == hi - lo:  # nothing cached before: attend to the new k/v directly
                out[lo:hi] = causal_attention(q[lo:hi], k[lo:hi], v[lo:hi], self.scale)
            else:
                out[lo:hi] = kernels.paged_attention_prefill(q[lo:hi], kc, vc, table, context_len, self.scale)
        return out


class ModelRunner:
    """Packs a scheduled batch into one forward (B=1, T=N) and returns logits for the last tokens."""

    def __init__(self, model, num_blocks: int, block_size: int):
        cfg = model.config
        weight = next(model.parameters())
        self.model, self.block_size, self.device = model, block_size, weight.device
        self.cache = PagedKVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                                  weight.dtype, weight.device)

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[torch.Tensor | None, list[Sequence]]:
        """Computes the batch's tokens; returns fp32 logits [S, V] for the S sequences whose
        scheduled tokens reach their end (the ones that sample a token now), and those sequences."""
        bs = self.block_size
        ids, pos, slots = [], [], []
        dec_rows, dec_tables, dec_lens, prefills = [], [], [], []
        last_rows, sampled = [], []
        for seq, n in batch:
            start, end, row, table = seq.num_computed, seq.num_computed + n, len(ids), seq.block_table
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            if n == 1:
                dec_rows.append(row)
                dec_tables.append(table)
                dec_lens.append(end)
            else:
                prefills.append((row, row + n, end, self._tensor(table[:-(-end // bs)], torch.int32)))
            if end == len(seq):
                last_rows.append(row + n - 1)
                sampled.append(seq)
        block_tables = context_lens = decode_rows = None
        if dec_rows:
            width = max(map(len, dec_tables))
            block_tables = self._tensor([t + [0] * (width - len(t)) for t in dec_tables], torch.int32)
            context_lens = self._tensor(dec_lens, torch.int32)
            if prefills:
                decode_rows = self._tensor(dec_rows)
        ids, pos, slots = self._tensor(ids), self._tensor(pos), self._tensor(slots)
        hidden = None
        if not prefills:  # decodes only: the whole step in one native call, when the model allows
            c = self.cache
            hidden = decode_step(self.model, ids, pos, c.k, c.v, slots, block_tables, context_lens, c.scale)
        if hidden is None:
            self.cache.layout = StepLayout(slots, decode_rows, block_tables, context_lens, prefills)
            try:
                hidden = self.model.hidden_states(ids[None], pos[None], self.cache)[0]
            finally:
                self.cache.layout = None
        if not sampled:
            return None, sampled
        if len(last_rows) != len(ids):
            hidden = hidden[self._tensor(last_rows)]
        return self.model.logits(hidden).float(), sampled
