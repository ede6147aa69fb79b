"""The PoP's per-packet job, verify the hop MAC and re-MAC under the next
hop's label and key, as one function per route, for CPython.

    relay = relay_for(in_key, out_label, out_key)     # once per route
    out = relay(packet)                              # bytes, or None: MAC does not verify

The same bytes as microtun.outer.relay (host_tests/test_pop_io.py checks
every excerpt shape, DATA and DATA_CE, both keys): the wire format and the
MAC are docs/OUTER.md's, HMAC-SHA256 truncated to 8 bytes over header[0:4]
|| len(payload) || excerpt. What differs is only how CPython gets there:

- the four SHA-256 states (ipad and opad of both keys) are prepared once
  per route and copied per packet (2 compressions per MAC instead of 4);
- they are CPython's built-in SHA-256 (`_sha2` / `_sha256`) where it
  exists: its copy() is a struct copy, where an OpenSSL 3 EVP context copy
  costs more than the compression it saves at these sizes (measured:
  docs/OUTER.md "PoP per-packet cost"); hashlib's OpenSSL one otherwise;
- the excerpt and its length prefix are built once and feed both MACs,
  with no per-call key object, scratch buffer or type dispatch.
"""
from hmac import compare_digest

from microtun import outer

try:                                    # CPython 3.12+
    from _sha2 import sha256 as _sha256
except ImportError:
    try:                                # CPython 3.11 and older
        from _sha256 import sha256 as _sha256
    except ImportError:                 # a build without the built-in hashes
        from hashlib import sha256 as _sha256

BACKEND = _sha256.__module__ if hasattr(_sha256, "__module__") else "hashlib"

_HDR = outer.HEADER_LEN
_HALF = outer.EXCERPT_HALF
_WHOLE = outer.EXCERPT_WHOLE
_MAX = outer.PAYLOAD_MAX
_LEN = [n.to_bytes(2, "big") for n in range(2048)]     # the length field of payloads up to 2047 bytes
_B0_DATA = outer.BYTE0_DATA


def states(key):
    """SHA-256 states after the key XOR ipad and XOR opad blocks (RFC 2104);
    key: 32 bytes or a microtun.outer.HopKey."""
    key = getattr(key, "key", key)
    return (_sha256(bytes(b ^ 0x36 for b in key) + b"\x36" * 32),
            _sha256(bytes(b ^ 0x5C for b in key) + b"\x5c" * 32))


def relay_for(in_key, out_label, out_key):
    """relay(packet) -> the packet under out_label and out_key (new bytes),
    or None when its hop MAC does not verify under in_key or its length is
    out of range. in_key, out_key: 32 bytes (or microtun.outer.HopKey)."""
    ih1, oh1 = states(in_key)
    ih2, oh2 = states(out_key)
    lbl = bytes((out_label >> 16, (out_label >> 8) & 0xFF, out_label & 0xFF))
    hdr_data = bytes((_B0_DATA,)) + lbl

    def relay(packet):
        n = len(packet) - _HDR
        if n > _WHOLE:
            if n > _MAX:
                return None
            tail = (_LEN[n] if n < 2048 else n.to_bytes(2, "big")) + packet[_HDR:_HDR + _HALF] + packet[-_HALF:]
        elif n >= 0:
            tail = _LEN[n] + packet[_HDR:]
        else:
            return None
        h = ih1.copy()
        h.update(packet[0:4])
        h.update(tail)
        o = oh1.copy()
        o.update(h.digest())
        if not compare_digest(o.digest()[:8], packet[4:_HDR]):
            return None
        hdr = hdr_data if packet[0] == _B0_DATA else bytes((packet[0],)) + lbl
        h = ih2.copy()
        h.update(hdr)
        h.update(tail)
        o = oh2.copy()
        o.update(h.digest())
        return hdr + o.digest()[:8] + packet[_HDR:]

    return relay
