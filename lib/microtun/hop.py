"""The outer plane, device side: the 12-byte header and its hop MAC.

Every datagram between two neighbouring nodes (device -> PoP, PoP -> PoP,
PoP -> gateway and back) is one outer packet: a 12-byte header, then the
payload (for DATA, the inner packet, opaque here). See docs/OUTER.md.

    byte 0      version (high 4 bits, = 1) | type (low 4 bits)
    bytes 1..3  label, 24-bit big-endian, local to the receiving node; 0 invalid
    bytes 4..11 hop MAC = HMAC-SHA256(hop_key, header[0:4] || len(payload)
                          as 2 bytes BE || excerpt)[:8]
                excerpt = payload            if len(payload) <= 32
                          payload[:16] || payload[-16:]   otherwise

The excerpt covers the inner header (type, receiver index, counter) and the
inner AEAD tag; the inner AEAD authenticates the rest end to end. The MAC
costs 4 SHA-256 compressions whatever the packet size (2 where the key's
pad blocks are hashed once: CPython, and microtun/hopmac.py's native code
on a frozen build).

This module is what a device loads: seal, verify, the probe reply.
microtun.outer is the whole plane (this module, plus what relays and the
gateway do: parse(), relay(), CPython fast paths, encoding an observed
address, the wire's limits and the LOOPS segment types by name), so
that a device's heap holds none of the relay side (docs/MEMORY.md).

Sans-I/O and allocation-light. Input from the network never raises here:
parse/verify return None/False. Misuse of the API (a wrong key length, a
label out of range, an oversized payload) raises ValueError.
"""
from hashlib import sha256

if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

# --- wire constants (docs/OUTER.md, "Header") -----------------------------
# Public only what the device's other modules and the relays both use; the
# rest are private here (ints folded in: no global, no qstr on a board) and
# public in microtun.outer, with the LOOPS segment types, the probe's
# bounds and parse(), which only relays and the gateway use (as public names
# here they cost a .mpy board 496 B of heap and 13 qstrs).
_VERSION = const(1)
HEADER_LEN = const(12)
_MAC_LEN = const(8)
_KEY_LEN = const(32)
_LABEL_MIN = const(1)
_LABEL_MAX = const(0xFFFFFF)
_PAYLOAD_MAX = const(0xFFFF)   # the MAC's length field is 2 bytes

TYPE_DATA = const(1)
TYPE_HOP_PROBE = const(2)
TYPE_HOP_PROBE_REPLY = const(3)
TYPE_HOP_KEEPALIVE = const(4)  # header only: refreshes NAT mappings and learned addresses, never answered
# Path validation (docs/OUTER.md §3): before a PoP moves a learned return
# address it sends the new source a PATH_CHALLENGE, 12 bytes whose MAC field
# is an 8-byte random nonce (no MAC: it must be no larger than the 12-byte
# keepalive that may provoke it); the device answers with a PATH_RESPONSE,
# the 12-byte header of seal(PATH_RESPONSE, label, key, nonce) without its
# payload: the MAC binds the nonce, which both ends know.
TYPE_PATH_CHALLENGE = const(5)
TYPE_PATH_RESPONSE = const(6)
# DATA whose path crossed a congested LOOPS segment (docs/LOOPS.md, LOOPS
# §6.2): handled as DATA, and counted ("ce_marks") by the device and gateway
TYPE_DATA_CE = const(7)
# 8..12: LOOPS segment types, between two PoPs only (microtun.outer.TYPE_SEG_*,
# docs/OUTER.md §1); a device verifies and drops them as unexpected
_TYPE_MAX = const(12)
# types 0 and 13..15 are reserved; receivers drop them as "unknown_type"

_EXCERPT_WHOLE = const(32)    # payloads up to this length are MACed whole
_EXCERPT_HALF = const(16)     # longer ones: first 16 || last 16 bytes

# observed-address encoding in HOP_PROBE_REPLY: family, port (BE), address
_V4 = const(4)
_V6 = const(6)
_V4_LEN = const(7)            # 1 + 2 + 4
_V6_LEN = const(19)           # 1 + 2 + 16

# --- HMAC backend ----------------------------------------------------------
# HMAC-SHA256 (RFC 2104), three ways to the same MAC:
# - native (microtun.hopmac, viper; MicroPython where the native emitter
#   and a little-endian port are there): the key's two midstates computed
#   once, then two compressions per MAC read straight from the packet and
#   written into it; nothing allocated per packet (docs/MEMORY.md).
# - copy (CPython): the ipad/opad blocks hashed once and each MAC copies the
#   states: 2 compressions per MAC instead of 4, and faster than the
#   stdlib's one-shot hmac.digest (OpenSSL 3 sets up a MAC context per
#   call; measured in docs/OUTER.md).
# - portable (MicroPython without the native module): hashlib has no copy()
#   and a digest() ends the object, so each MAC hashes the 64-byte blocks
#   again: two SHA-256 objects and two digests per MAC.
_COPY = hasattr(sha256(), "copy")
try:
    if _COPY:
        raise ImportError       # CPython: hashlib's copies
    import microtun.hopmac as _native   # (not `from microtun import`: endpoint.py says why)
except (ImportError, SyntaxError, ValueError, MemoryError):
    # ImportError: CPython, a big-endian port, or not shipped; SyntaxError: a
    # port without the native emitter compiling the viper source; ValueError:
    # a .mpy of another -march; MemoryError: no room to compile it
    _native = None
HMAC = "native" if _native else "copy" if _COPY else "portable"

_MSG_MAX = const(38)          # 4 header + 2 length + 32 excerpt bytes


class HopKey:
    """A 32-byte hop key, with its HMAC state precomputed: the two
    midstates (native), or the two hashed pad blocks (CPython), or the pad
    blocks and a scratch buffer for the MAC input (not shared between
    HopKey objects, so a MAC allocates only the hash objects and digests).
    any_message=True keeps the pads everywhere, for _hmac over a message of
    any length (the responder's mac1 check), which the native MAC is not."""

    def __init__(self, key, any_message=False):
        if not isinstance(key, (bytes, bytearray)) or len(key) != _KEY_LEN:
            raise ValueError("a hop key must be %d bytes" % _KEY_LEN)
        self.key = bytes(key)
        if _native:
            self._st = _native.keyed(key)
            if not any_message:
                return
        self._ipad = bytes(k ^ 0x36 for k in key) + b"\x36" * 32
        self._opad = bytes(k ^ 0x5C for k in key) + b"\x5c" * 32
        if _COPY:
            self._ih = sha256(self._ipad)
            self._oh = sha256(self._opad)
        self._msg = bytearray(_MSG_MAX)
        self._mv = memoryview(self._msg)


def _hmac_portable(hk, msg):
    h = sha256(hk._ipad)
    h.update(msg)
    o = sha256(hk._opad)
    o.update(h.digest())
    return o.digest()


def _hmac_copy(hk, msg):
    h = hk._ih.copy()
    h.update(msg)
    o = hk._oh.copy()
    o.update(h.digest())
    return o.digest()


_hmac = _hmac_copy if _COPY else _hmac_portable


def _message(hk, src, n):
    """Fill hk's scratch with the MAC input for the packet in src (header
    bytes 0..3 set, n bytes of payload from byte 12); return it (a view)."""
    m = hk._msg
    m[0] = src[0]
    m[1] = src[1]
    m[2] = src[2]
    m[3] = src[3]
    m[4] = n >> 8
    m[5] = n & 0xFF
    if n <= _EXCERPT_WHOLE:
        m[6:6 + n] = src[HEADER_LEN:HEADER_LEN + n]
        return hk._mv[:6 + n]
    m[6:22] = src[HEADER_LEN:HEADER_LEN + _EXCERPT_HALF]
    m[22:38] = src[HEADER_LEN + n - _EXCERPT_HALF:HEADER_LEN + n]
    return m


def _put_mac(hk, buf, n):
    """buf[4:12] = the hop MAC of the packet in buf: header bytes 0..3 set,
    n bytes of payload from byte 12."""
    if _native:
        _native.seal(hk._st, buf, n)
        return
    d = _hmac(hk, _message(hk, buf, n))
    if _COPY:                       # CPython: the slice is faster (seal_in_place 2.0 us, +0.2 us with the loop)
        buf[4:HEADER_LEN] = d[:_MAC_LEN]
    else:                           # byte by byte: no 8-byte slice object per packet sent (48 B on a board)
        for i in range(_MAC_LEN):
            buf[4 + i] = d[i]


def _check_mac(hk, packet, n):
    """True when packet[4:12] is the hop MAC of the packet (n bytes of
    payload); constant time in the MAC's bytes."""
    if _native:
        return _native.verify(hk._st, packet, n)
    return _mac_ok(_hmac(hk, _message(hk, packet, n)), packet)


# --- sending ---------------------------------------------------------------

def _check_buf(buf, end):
    if end - HEADER_LEN > _PAYLOAD_MAX:
        raise ValueError("outer payload must be at most %d bytes, got %d" % (_PAYLOAD_MAX, end - HEADER_LEN))
    if len(buf) < end:
        raise ValueError("buffer of %d bytes is too small for a %d-byte packet" % (len(buf), end))


def seal_in_place(buf, ptype, label, hopkey, plen):
    """Write the 12-byte header into buf[0:12] for the payload that is
    already at buf[12:12+plen]; return the packet length (12 + plen).

    The zero-copy path: the inner layer writes its packet at offset
    HEADER_LEN once, and sending it on two paths is two seal_in_place calls
    (each rewrites only the header) and two sends."""
    if ptype < TYPE_DATA or ptype > _TYPE_MAX:
        raise ValueError("outer type must be 1..%d (a TYPE_* of microtun.outer), got %r" % (_TYPE_MAX, ptype))
    if label < _LABEL_MIN or label > _LABEL_MAX:
        raise ValueError("label must be in 1..%d, got %r" % (_LABEL_MAX, label))
    end = HEADER_LEN + plen
    _check_buf(buf, end)
    buf[0] = (_VERSION << 4) | ptype
    buf[1] = label >> 16
    buf[2] = (label >> 8) & 0xFF
    buf[3] = label & 0xFF
    _put_mac(hopkey, buf, plen)
    return end


def seal(ptype, label, hopkey, payload):
    """A new outer packet (a bytearray): header with type, label and the MAC
    under hopkey, then payload. The payload is copied once (no bytes() of
    the result: that was a second copy of every packet sent)."""
    n = len(payload)
    buf = bytearray(HEADER_LEN + n)
    buf[HEADER_LEN:] = payload
    seal_in_place(buf, ptype, label, hopkey, n)
    return buf


# --- receiving -------------------------------------------------------------

def reject_reason(packet):
    """Why the packet fails the cheap checks before any MAC (too short or
    long, another version, a reserved type, label 0), named for counters
    (outer.DROP_*), or None if it passes them (outer.parse())."""
    n = len(packet)
    if n < HEADER_LEN:
        return "short"            # shorter than the 12-byte header
    if n - HEADER_LEN > _PAYLOAD_MAX:
        return "too_long"         # payload longer than 65535 bytes
    if packet[0] >> 4 != _VERSION:
        return "bad_version"      # version nibble != 1
    ptype = packet[0] & 0x0F
    if ptype < TYPE_DATA or ptype > _TYPE_MAX:
        return "unknown_type"     # reserved type
    if not (packet[1] | packet[2] | packet[3]):
        return "bad_label"        # label 0
    return None


# _mac_ok(d, packet): constant time, d[0:8] == packet[4:12]. One function
# defined, not both (each is a function object and a global in a board's heap).
try:
    from _operator import _compare_digest     # CPython's hmac.compare_digest, without importing hmac

    def _mac_ok(d, packet):
        # in C where CPython has it (a PoP or gateway verifies every
        # packet: the Python loop was ~12 % of the gateway's per-packet time)
        return _compare_digest(d[:_MAC_LEN], packet[4:HEADER_LEN])
except ImportError:                           # MicroPython
    def _mac_ok(d, packet):
        r = 0
        for i in range(_MAC_LEN):
            r |= d[i] ^ packet[4 + i]
        return r == 0


def verify(hopkey, packet):
    """True when packet's hop MAC verifies under hopkey. Never raises on
    packets of any length; call parse() first for the cheap checks."""
    n = len(packet) - HEADER_LEN
    if n < 0 or n > _PAYLOAD_MAX:
        return False
    return _check_mac(hopkey, packet, n)


# --- probes ----------------------------------------------------------------
# A HOP_PROBE payload is opaque to the node that answers it. The reply
# carries the observed address first, then as much of the probe as fits in
# the probe's own length: a reply is never longer than its probe. A probe
# must therefore be at least outer.PROBE_MIN (19) bytes; microtun's senders use
# probe_body(): 4-byte id || 4-byte ticks, zero-padded to 27 bytes, so the
# 8 meaningful bytes come back even behind an IPv6 address.

_PROBE_BODY_LEN = const(27)   # 8 + the 19 bytes of an IPv6 address


def probe_body(probe_id, ticks):
    """The 27-byte probe payload microtun senders use: id and send time (ms
    ticks), both 32-bit big-endian, then zero padding."""
    return (probe_id & 0xFFFFFFFF).to_bytes(4, "big") + (ticks & 0xFFFFFFFF).to_bytes(4, "big") + \
        bytes(_PROBE_BODY_LEN - 8)


def parse_probe_reply(payload):
    """(echo, family, port, addr) from a HOP_PROBE_REPLY payload (the
    address, then what fitted of the probe), or None."""
    n = len(payload)
    if n == 0:
        return None
    alen = _V4_LEN if payload[0] == _V4 else _V6_LEN
    if n < alen:
        return None
    a = decode_addr(payload[0:alen])
    if a is None:
        return None
    return (bytes(payload[alen:n]),) + a


def path_response(label, hopkey, challenge):
    """The 12-byte PATH_RESPONSE to a PATH_CHALLENGE (whose bytes 4..11 are
    the nonce) on label: seal(PATH_RESPONSE, label, hopkey, nonce)[:12]."""
    return seal(TYPE_PATH_RESPONSE, label, hopkey, challenge[4:HEADER_LEN])[0:HEADER_LEN]


def decode_addr(buf):
    """(family, port, addr bytes) from exactly one encoded address
    (outer.encode_addr), or None."""
    n = len(buf)
    if not (n == _V4_LEN and buf[0] == _V4 or n == _V6_LEN and buf[0] == _V6):
        return None
    return buf[0], (buf[1] << 8) | buf[2], bytes(buf[3:n])


def format_addr(family, port, addr):
    """'1.2.3.4:5' or '[2001:db8:0:0:0:0:0:1]:5' (IPv6 groups unabbreviated)."""
    if family == _V4:
        return "%d.%d.%d.%d:%d" % (addr[0], addr[1], addr[2], addr[3], port)
    groups = ["%x" % ((addr[i] << 8) | addr[i + 1]) for i in range(0, 16, 2)]
    return "[%s]:%d" % (":".join(groups), port)
