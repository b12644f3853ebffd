from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, Status

Batch = list[tuple[Sequence, int]]  # (sequence, number of its tokens to compute this step)


class Scheduler:
    """Continuous batching: each step runs the running sequences' next tokens first, oldest first,
    then admits waiting ones (prefill, chunked to the token budget). When the cache runs out of
    blocks the newest running sequence is preempted and later recomputed, never dropped."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_batch_tokens: int):
        if max_batch_tokens < max_num_seqs:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must be >= max_num_seqs ({max_num_seqs})")
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        batch, budget = [], self.max_batch_tokens
        queue, self.running = deque(self.running), []
        while queue:
            seq = queue.popleft()
            while not self.blocks.can_append(seq) and queue:
                self._preempt(queue.pop())
            if not self.blocks.can_append(seq):
                self._preempt(seq)
                continue
            self.blocks.append(seq)
            self.running.append(seq)
            n = min(len(seq) - seq.num_computed, budget)
            if n > 0:
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            cached = self.blocks.allocate(seq)
            if seq.num_preemptions == 0:
                seq.num_cached_prompt = cached
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(len(seq) - seq.num_computed, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def _preempt(self, seq: Sequence):
        self.blocks.release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def advance(self, batch: Batch):
        """Record that the batch's tokens are now in the cache."""
        for seq, n in batch:
            seq.num_computed += n
            self.blocks.commit(seq)

    def reap(self):
        """Release the blocks of sequences that finished this step."""
        done = [s for s in self.running if s.finished]
        if done:
            self.running = [s for s in self.running if not s.finished]
            for seq in done:
                self.blocks.release(seq)
