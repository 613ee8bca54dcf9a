"""Block bookkeeping for the paged KV cache: free blocks, reference counts, copy on write.

Plain Python, no tensors: the runner owns the storage and performs the block copies this
manager asks for. A sequence's block table lists the blocks holding its tokens in order.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    """Hands out fixed-size KV blocks; blocks shared by forked sequences are reference counted."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        block = self.free_blocks.popleft()
        self.ref_counts[block] = 1
        return block

    def allocate(self, num_tokens: int) -> list[int]:
        """A fresh block table with room for num_tokens tokens."""
        needed = self.blocks_for(num_tokens)
        if needed > len(self.free_blocks):
            raise MemoryError(f"KV cache has {len(self.free_blocks)} free blocks, {needed} needed")
        return [self._take() for _ in range(needed)]

    def fork(self, block_table: list[int]) -> list[int]:
        """A copy of a block table that shares every block with the original."""
        for block in block_table:
            self.ref_counts[block] += 1
        return list(block_table)

    def free(self, block_table: list[int]) -> None:
        for block in block_table:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        block_table.clear()

    def slots_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Blocks that writing the token at index num_tokens - 1 requires (a new one or a copy)."""
        index = (num_tokens - 1) // self.block_size
        if index >= len(block_table):
            return 1
        return 1 if self.ref_counts[block_table[index]] > 1 else 0

    def prepare_write(self, block_table: list[int], num_tokens: int) -> tuple[int, int] | None:
        """Make the slot of token num_tokens - 1 writable by this table alone.

        Appends a block when the token starts a new one; when its block is shared, replaces it with
        a private copy and returns (source, destination) for the runner to copy. Raises MemoryError
        when no block is free (the scheduler checks `slots_needed` first).
        """
        index = (num_tokens - 1) // self.block_size
        if index == len(block_table):
            block_table.append(self._take())
            return None
        if index > len(block_table):
            raise ValueError(f"token {num_tokens - 1} is past the end of a {len(block_table)}-block table")
        shared = block_table[index]
        if self.ref_counts[shared] == 1:
            return None
        private = self._take()
        self.ref_counts[shared] -= 1
        block_table[index] = private
        return shared, private
