"""Dedup and anti-replay window (RFC 6479), keyed by the inner 64-bit counter.

The window is a ring of 32-bit words in a preallocated array('I'): sliding
forward clears whole words, never shifts a big integer, so the hot path does
not allocate. Two steps, as in boringtun: `will_accept(n)` is a cheap check to
run *before* decrypting; `mark(n)` records n only *after* the AEAD tag
verified, so forged packets can never move the window.

Window size W: any counter within W below the highest seen is still accepted
once. It must cover rate x (worst delay difference between paths + jitter).
"""
from array import array

_BOARD = __import__("sys").implementation.name == "micropython"
if not _BOARD:
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

_WORD_BITS = const(32)
_WORD_SHIFT = const(5)
_BIT_MASK = const(31)

# WireGuard's REJECT_AFTER_MESSAGES (protocol paper §6.1): a counter at or above
# this is never accepted, far below the 2**64 nonce space.
REJECT_AFTER_MESSAGES = const(2**64 - 2**13 - 1)

DEVICE_WINDOW = const(1024)
GATEWAY_WINDOW = const(8128)


class ReplayWindow:
    if not _BOARD:      # CPython (a gateway keeps one per session); MicroPython has no slots
        __slots__ = ("_ring", "_blocks", "window", "last")

    def __init__(self, size=DEVICE_WINDOW):
        if not isinstance(size, int) or size < 32 or size > 1 << 20:
            raise ValueError("replay window size must be an int from 32 to 1048576 packets")
        # RFC 6479 §3: a ring of blocks, one of which is the block being
        # filled, so the usable window is (blocks - 1) * 32 >= size. The RFC
        # rounds the blocks up to a power of two to index with a mask; here
        # the index is block % blocks, so 1024 packets take 33 words, not
        # 64 (124 bytes less per keypair on a board, which holds two
        # through every rekey: docs/MEMORY.md).
        blocks = (size + _WORD_BITS - 1) // _WORD_BITS + 1
        self._blocks = blocks
        if _BOARD:
            # Sized from a range, then zeroed: from bytes(4 * blocks) the ring
            # would be made above that temporary of its own size, so it landed
            # higher in a board's heap than it needs to (docs/MEMORY.md).
            ring = self._ring = array("I", range(blocks))
            for i in range(blocks):
                ring[i] = 0
        else:
            # CPython (the gateway: 256 words per session): the zeroing loop
            # would cost ~25 us per handshake, 5 % of a first contact
            self._ring = array("I", bytes(4 * blocks))
        self.window = (blocks - 1) * _WORD_BITS
        self.last = -1  # highest counter marked so far; -1: none yet

    def will_accept(self, n):
        """Cheap pre-decrypt check: False if n is replayed, too old or out of range."""
        if n < 0 or n >= REJECT_AFTER_MESSAGES:
            return False
        last = self.last
        if n > last:
            return True
        if last - n >= self.window:
            return False
        return not (self._ring[(n >> _WORD_SHIFT) % self._blocks] >> (n & _BIT_MASK)) & 1

    def mark(self, n):
        """Record n after its packet authenticated. Returns False (and records
        nothing) if n was already seen, is too old or out of range."""
        if n < 0 or n >= REJECT_AFTER_MESSAGES:
            return False
        ring = self._ring
        blocks = self._blocks
        last = self.last
        block = n >> _WORD_SHIFT
        if n > last:
            cur = last >> _WORD_SHIFT if last >= 0 else -1
            diff = block - cur
            if diff > blocks:
                diff = blocks
            for i in range(1, diff + 1):
                ring[(cur + i) % blocks] = 0
            self.last = n
        elif last - n >= self.window:
            return False
        i = block % blocks
        word = ring[i]
        if (word >> (n & _BIT_MASK)) & 1:
            return False
        ring[i] = word | (1 << (n & _BIT_MASK))
        return True
