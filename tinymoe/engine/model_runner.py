from dataclasses import dataclass

import torch

from .. import kernels
from ..models.native_decode import decode_step
from .scheduler import Batch
from .sequence import Sequence


def step_tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A step's host-built ints on the device. On CUDA they are built in pinned memory and copied
    asynchronously (torch.tensor(..., device=cuda) waits for each copy); the pinned allocator
    keeps the buffer until its copy is done."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


@dataclass
class StepLayout:
    """Where this step's packed tokens go in the cache and what each one attends to."""
    slot_mapping: torch.Tensor             # [N]
    decode_rows: torch.Tensor | None       # rows with one new token (None: every row, or no row)
    block_tables: torch.Tensor | None      # [D, max_blocks] for those rows
    context_lens: torch.Tensor | None      # [D]
    prefill_rows: torch.Tensor | None      # rows of the prefilling sequences (None: every row, or no row)
    prefill_tables: torch.Tensor | None    # [P, max_blocks] int32 for those P sequences
    prefill_cu_seqlens: torch.Tensor | None  # [P + 1] int32: where each one's rows start among them
    prefill_lens: torch.Tensor | None      # [P] int32 context lengths


@dataclass
class StepInputs:
    """One step's packed tokens [N], their positions [N], the cache layout, and the rows that
    sample (None: all): what rank 0 sends the other ranks under expert parallelism."""
    ids: torch.Tensor
    positions: torch.Tensor
    layout: StepLayout
    last_rows: torch.Tensor | None


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
        if s.prefill_tables is None:
            return kernels.paged_attention_decode(q, kc, vc, s.block_tables, s.context_lens, self.scale)

        def prefill(rows):  # every prefilling sequence in one call
            return kernels.paged_attention_prefill_varlen(rows, kc, vc, s.prefill_tables, s.prefill_cu_seqlens,
                                                          s.prefill_lens, self.scale)
        if s.decode_rows is None:
            return prefill(q)
        out = torch.empty_like(q)
        out[s.decode_rows] = kernels.paged_attention_decode(q[s.decode_rows], kc, vc, s.block_tables,
                                                            s.context_lens, self.scale)
        out[s.prefill_rows] = prefill(q[s.prefill_rows])
        return out


class ModelRunner:
    """Packs a scheduled batch into one forward (B=1, T=N) and returns logits for the last tokens."""

    def __init__(self, model, num_blocks: int, block_size: int, ranks=None):
        cfg = model.config
        self.ranks = ranks  # an engine.parallel.Ranks under expert parallelism
        weight = next(model.parameters())
        self.model, self.block_size, self.device = model, block_size, weight.device
        self.cache = PagedKVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                                  weight.dtype, weight.device)

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return step_tensor(values, dtype, self.device)

    def _tables(self, tables: list[list[int]]) -> torch.Tensor:
        """[len(tables), longest] int32, short rows padded with block 0 (never read: masked by length)."""
        width = max(map(len, tables))
        return self._tensor([t + [0] * (width - len(t)) for t in tables], torch.int32)

    def pack(self, batch: Batch) -> tuple["StepInputs", list[Sequence]]:
        """The batch's tokens and cache layout as tensors, and the sequences that sample now."""
        bs = self.block_size
        ids, pos, slots = [], [], []
        dec_rows, dec_tables, dec_lens = [], [], []
        pre_rows, pre_tables, pre_starts, pre_lens = [], [], [0], []
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
                pre_rows += range(row, row + n)
                pre_tables.append(table[:-(-end // bs)])
                pre_starts.append(pre_starts[-1] + n)
                pre_lens.append(end)
            if end == len(seq):
                last_rows.append(row + n - 1)
                sampled.append(seq)
        block_tables = context_lens = decode_rows = None
        if dec_rows:
            block_tables, context_lens = self._tables(dec_tables), self._tensor(dec_lens, torch.int32)
        prefill_tables = cu_seqlens = prefill_lens = prefill_rows = None
        if pre_tables:
            prefill_tables, prefill_lens = self._tables(pre_tables), self._tensor(pre_lens, torch.int32)
            cu_seqlens = self._tensor(pre_starts, torch.int32)
        if dec_rows and pre_tables:
            decode_rows, prefill_rows = self._tensor(dec_rows), self._tensor(pre_rows)
        layout = StepLayout(self._tensor(slots), decode_rows, block_tables, context_lens,
                            prefill_rows, prefill_tables, cu_seqlens, prefill_lens)
        last = None if len(last_rows) == len(ids) else self._tensor(last_rows)
        return StepInputs(self._tensor(ids), self._tensor(pos), layout, last), sampled

    @torch.inference_mode()
    def forward(self, step: "StepInputs") -> torch.Tensor:
        """Hidden states [S, D] of the step's sampling rows (every row when `step.last_rows` is None)."""
        self.cache.layout = step.layout
        try:
            hidden = self.model.hidden_states(step.ids[None], step.positions[None], self.cache)[0]
        finally:
            self.cache.layout = None
        return hidden if step.last_rows is None else hidden[step.last_rows]

    def _one_call(self, step: "StepInputs") -> torch.Tensor | None:
        """The logits of a decodes-only step from the one-call native step, when the model allows
        (not with its experts spread over ranks: the collectives run in Python); else None."""
        s, c = step.layout, self.cache
        if s.prefill_tables is not None or getattr(self.model, "expert_ranks", None) is not None:
            return None
        logits = decode_step(self.model, step.ids, step.positions, c.k, c.v, s.slot_mapping, s.block_tables,
                             s.context_lens, c.scale)
        return logits if logits is None or step.last_rows is None else logits[step.last_rows]

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[torch.Tensor | None, list[Sequence]]:
        """Computes the batch's tokens; returns fp32 logits [S, V] for the S sequences whose
        scheduled tokens reach their end (the ones that sample a token now), and those sequences.
        Under expert parallelism the other ranks get the step first and run the same forward."""
        step, sampled = self.pack(batch)
        logits = self._one_call(step)
        if logits is None:
            hidden = self.forward(step) if self.ranks is None else self.ranks.step(self.forward, step)
            logits = self.model.logits(hidden) if sampled else None
        return (logits.float() if sampled else None), sampled
