from collections import OrderedDict

from .sequence import Sequence


class Block:
    __slots__ = ("ref", "hash", "tokens")

    def __init__(self):
        self.ref = 0
        self.hash: int | None = None
        self.tokens: tuple[int, ...] = ()


class BlockManager:
    """Owns the paged KV cache's blocks: a block table per sequence, reference counts, and a
    prefix cache of full blocks keyed by a hash chained through every earlier block."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block() for _ in range(num_blocks)]
        # Blocks nobody references, least recently freed first; cached ones stay reusable until taken.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # chained hash -> block id
        self.hashes: dict[int, list[int]] = {}  # seq id -> hashes of its registered full blocks
        self.prefix_hits = 0  # blocks reused from the prefix cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _tokens(self, seq: Sequence, i: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])

    def _match(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Cached blocks covering a prefix of `seq`; the last token is always left to compute."""
        ids, hashes, h = [], [], 0
        if not self.prefix_caching:
            return ids, hashes
        for i in range((len(seq) - 1) // self.block_size):
            tokens = self._tokens(seq, i)
            h = hash((h, tokens))
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].tokens != tokens:
                break
            ids.append(bid)
            hashes.append(h)
        return ids, hashes

    def can_allocate(self, seq: Sequence) -> bool:
        hits, _ = self._match(seq)
        revived = sum(1 for b in hits if self.blocks[b].ref == 0)
        return self.blocks_for(len(seq)) - len(hits) <= self.num_free - revived

    def allocate(self, seq: Sequence):
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table
        hits, hashes = self._match(seq)
        for bid in hits:
            block = self.blocks[bid]
            if block.ref == 0:
                del self.free[bid]
            block.ref += 1
        seq.block_table = list(hits)
        self.hashes[seq.seq_id] = hashes
        seq.num_computed = len(hits) * self.block_size
        self.prefix_hits += len(hits)
        self._grow(seq)
        return len(hits) * self.block_size

    def can_append(self, seq: Sequence) -> bool:
        return self.blocks_for(len(seq)) - len(seq.block_table) <= self.num_free

    def append(self, seq: Sequence):
        """Make room for every token of `seq` (after new tokens were appended)."""
        self._grow(seq)

    def _grow(self, seq: Sequence):
        while len(seq.block_table) * self.block_size < len(seq):
            bid, _ = self.free.popitem(last=False)
            block = self.blocks[bid]
            if block.hash is not None and self.cached.get(block.hash) == bid:
                del self.cached[block.hash]
            block.hash, block.tokens, block.ref = None, (), 1
            seq.block_table.append(bid)

    def commit(self, seq: Sequence):
        """Register the blocks of `seq` that are now full and computed in the prefix cache."""
        if not self.prefix_caching:
            return
        hashes = self.hashes[seq.seq_id]
        for i in range(len(hashes), seq.num_computed // self.block_size):
            tokens = self._tokens(seq, i)
            h = hash((hashes[-1] if hashes else 0, tokens))
            hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.tokens = h, tokens
            self.cached.setdefault(h, seq.block_table[i])

    def release(self, seq: Sequence):
        """Drop the sequence's references; its tail blocks become the first to be reused."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref -= 1
            if block.ref == 0:
                self.free[bid] = None
        seq.block_table = []
        seq.num_computed = 0
        self.hashes.pop(seq.seq_id, None)
