"""The outer plane in full: per-hop authenticated, label-switched framing.

Everything of microtun.hop (the header, the hop MAC, seal / parse / verify,
probe replies: what a device needs; the format is described there and in
docs/OUTER.md), plus what relays and the gateway do: relay() one packet
from one hop key to the next, answer a probe with the observed address,
name the types and drop reasons, and on CPython verify and relay through
hash-state copies. PoPs, the gateway and tests import this module; a device
imports microtun.hop only, so none of this sits in its heap.
"""
import sys

from microtun.hop import *  # noqa: F401,F403  (the device-side plane, re-exported)
from microtun.hop import (_COPY, _check_buf, _check_mac, _hmac, _hmac_copy, _hmac_portable, _put_mac,
                          HEADER_LEN, seal_in_place,
                          TYPE_DATA, TYPE_HOP_PROBE, TYPE_HOP_PROBE_REPLY, TYPE_HOP_KEEPALIVE,
                          TYPE_PATH_CHALLENGE, TYPE_PATH_RESPONSE, TYPE_DATA_CE,
                          verify as _verify_portable)

if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

# --- wire constants microtun.hop keeps private (a device's code uses them
# folded in; as public names there they were globals in its heap) ----------
VERSION = const(1)
MAC_LEN = const(8)
KEY_LEN = const(32)
LABEL_MIN = const(1)
LABEL_MAX = const(0xFFFFFF)
PAYLOAD_MAX = const(0xFFFF)   # the MAC's length field is 2 bytes
PROBE_MAX = const(32)         # HOP_PROBE payload: opaque, at most 32 bytes ...
PROBE_MIN = const(19)         # ... and at least the longest address a reply carries
# 8..12: LOOPS segment types, between two PoPs only (docs/OUTER.md §1)
TYPE_SEG_DATA = const(8)
TYPE_SEG_REPAIR = const(9)
TYPE_SEG_NACK = const(10)
TYPE_SEG_PING = const(11)
TYPE_SEG_PONG = const(12)
_TYPE_MAX = const(12)        # types 0 and 13..15 are reserved (as in microtun.hop)

TYPE_NAMES = {TYPE_DATA: "DATA", TYPE_HOP_PROBE: "HOP_PROBE", TYPE_HOP_PROBE_REPLY: "HOP_PROBE_REPLY",
              TYPE_HOP_KEEPALIVE: "HOP_KEEPALIVE", TYPE_PATH_CHALLENGE: "PATH_CHALLENGE",
              TYPE_PATH_RESPONSE: "PATH_RESPONSE", TYPE_DATA_CE: "DATA_CE", TYPE_SEG_DATA: "SEG_DATA",
              TYPE_SEG_REPAIR: "SEG_REPAIR", TYPE_SEG_NACK: "SEG_NACK", TYPE_SEG_PING: "SEG_PING",
              TYPE_SEG_PONG: "SEG_PONG"}

EXCERPT_WHOLE = const(32)     # payloads up to this length are MACed whole
EXCERPT_HALF = const(16)      # longer ones: first 16 || last 16 bytes

# observed-address encoding in HOP_PROBE_REPLY: family, port (BE), address
ADDR_V4 = const(4)
ADDR_V6 = const(6)
ADDR_V4_LEN = const(7)        # 1 + 2 + 4
ADDR_V6_LEN = const(19)       # 1 + 2 + 16

# first byte of a version-1 packet of each type, for cheap dispatch
BYTE0_DATA = const(0x11)
BYTE0_HOP_PROBE = const(0x12)
BYTE0_HOP_PROBE_REPLY = const(0x13)
BYTE0_HOP_KEEPALIVE = const(0x14)
BYTE0_PATH_CHALLENGE = const(0x15)
BYTE0_PATH_RESPONSE = const(0x16)
BYTE0_DATA_CE = const(0x17)

# What a relay may know of the inner plane (docs/PROTOCOL.md, messages.py):
# a handshake message is a DATA payload of one fixed length whose first byte
# is its type. Recognising one needs no key; the first PoP de-duplicates and
# rate-limits INITs from a device and RESPONSEs/COOKIEs to it (docs/OUTER.md §5).
INNER_TYPE_INIT = const(1)
INNER_TYPE_RESPONSE = const(2)
INNER_TYPE_COOKIE = const(3)
INNER_TYPE_STALE = const(5)
INNER_INIT_LEN = const(148)
INNER_RESPONSE_LEN = const(92)
INNER_COOKIE_LEN = const(52)
INNER_STALE_LEN = const(48)

# --- drop reasons: parse() failures, as reject_reason() names them --------
DROP_SHORT = "short"              # shorter than the 12-byte header
DROP_TOO_LONG = "too_long"        # payload longer than PAYLOAD_MAX
DROP_BAD_VERSION = "bad_version"  # version nibble != 1
DROP_UNKNOWN_TYPE = "unknown_type"  # reserved type
DROP_BAD_LABEL = "bad_label"      # label 0
DROP_BAD_MAC = "bad_mac"          # hop MAC does not verify

_equal_bytes = None
if sys.implementation.name != "micropython":
    try:
        # absolute import: the stdlib module, never microtun/hmac.py
        from hmac import compare_digest as _equal_bytes
    except ImportError:
        _equal_bytes = None


def parse(packet):
    """The cheap checks, before any MAC: (type, label), or None when the
    packet is too short/long, of another version, of a reserved type, or
    has label 0. reject_reason() names the failure for counters."""
    n = len(packet)
    if n < HEADER_LEN or n - HEADER_LEN > PAYLOAD_MAX:
        return None
    b0 = packet[0]
    ptype = b0 & 0x0F
    if b0 >> 4 != VERSION or ptype < TYPE_DATA or ptype > _TYPE_MAX:
        return None
    label = (packet[1] << 16) | (packet[2] << 8) | packet[3]
    if label == 0:
        return None
    return ptype, label


def seal_into(buf, ptype, label, hopkey, payload):
    """Copy payload to buf[12:] and seal it there; return the packet length."""
    n = len(payload)
    _check_buf(buf, HEADER_LEN + n)     # before the copy, which would fail less clearly
    buf[HEADER_LEN:HEADER_LEN + n] = payload
    return seal_in_place(buf, ptype, label, hopkey, n)


def label_of(packet):
    """The label field of a packet at least 4 bytes long (no checks)."""
    return (packet[1] << 16) | (packet[2] << 8) | packet[3]


# --- relaying --------------------------------------------------------------

def _relay_portable(packet, in_key, out_label, out_key):
    n = len(packet) - HEADER_LEN
    if n < 0 or n > PAYLOAD_MAX or not _check_mac(in_key, packet, n):
        return None
    # same type and payload: only the label and the MAC change
    out = bytearray(packet)
    out[1] = out_label >> 16
    out[2] = (out_label >> 8) & 0xFF
    out[3] = out_label & 0xFF
    _put_mac(out_key, out, n)
    return bytes(out)


# CPython versions of the two receive-side calls a PoP makes per packet:
# the same MAC (tests check byte equality with the portable ones) built
# from slices and hash-state copies, which is ~40 % faster there.

def _copy_tail(packet, n):
    if n <= EXCERPT_WHOLE:
        return n.to_bytes(2, "big") + packet[HEADER_LEN:]
    return n.to_bytes(2, "big") + packet[HEADER_LEN:HEADER_LEN + EXCERPT_HALF] + packet[-EXCERPT_HALF:]


def _copy_mac(hk, hdr, tail):
    h = hk._ih.copy()
    h.update(hdr)
    h.update(tail)
    o = hk._oh.copy()
    o.update(h.digest())
    return o.digest()[:MAC_LEN]


def _verify_copy(hopkey, packet):
    n = len(packet) - HEADER_LEN
    if n < 0 or n > PAYLOAD_MAX:
        return False
    return _equal_bytes(_copy_mac(hopkey, packet[0:4], _copy_tail(packet, n)), packet[4:HEADER_LEN])


def _relay_copy(packet, in_key, out_label, out_key):
    n = len(packet) - HEADER_LEN
    if n < 0 or n > PAYLOAD_MAX:
        return None
    tail = _copy_tail(packet, n)
    if not _equal_bytes(_copy_mac(in_key, packet[0:4], tail), packet[4:HEADER_LEN]):
        return None
    hdr = bytes((packet[0], out_label >> 16, (out_label >> 8) & 0xFF, out_label & 0xFF))
    return hdr + _copy_mac(out_key, hdr, tail) + packet[HEADER_LEN:]


_FAST = _COPY and _equal_bytes is not None


def verify(hopkey, packet):
    """True when packet's hop MAC verifies under hopkey (microtun.hop.verify,
    through hash-state copies on CPython). Never raises on packets of any
    length; call parse() first for the cheap checks."""
    if _FAST and type(packet) is bytes:
        return _verify_copy(hopkey, packet)
    return _verify_portable(hopkey, packet)


def relay(packet, in_key, out_label, out_key):
    """A relay's whole job for one packet: verify under in_key, then return
    the same type and payload under out_label and out_key (new bytes), or
    None when the MAC fails. The payload is never parsed or changed."""
    if _FAST and type(packet) is bytes:
        return _relay_copy(packet, in_key, out_label, out_key)
    return _relay_portable(packet, in_key, out_label, out_key)


# --- probes ----------------------------------------------------------------

def probe_fields(echo):
    """(probe_id, ticks) from an echoed probe_body() (its first 8 bytes come
    back whatever the address family), or None if malformed."""
    if len(echo) < 8:
        return None
    return int.from_bytes(echo[0:4], "big"), int.from_bytes(echo[4:8], "big")


def probe_reply_payload(probe, family, port, addr):
    """HOP_PROBE_REPLY payload: the address the prober was seen from
    (encode_addr), then the first len(probe) - len(address) bytes of the
    probe: never longer than the probe. A probe shorter than the address
    (PROBE_MIN covers both families) or longer than PROBE_MAX is a
    ValueError: receivers drop those as bad_probe before answering."""
    if len(probe) > PROBE_MAX:
        raise ValueError("a probe payload is at most %d bytes, got %d" % (PROBE_MAX, len(probe)))
    a = encode_addr(family, port, addr)
    if len(probe) < len(a):
        raise ValueError("a %d-byte probe is too short for a reply carrying a %d-byte address (the reply "
                         "would be longer than the probe)" % (len(probe), len(a)))
    return a + bytes(probe[0:len(probe) - len(a)])
def encode_addr(family, port, addr):
    """family (4 or 6) || port (2 bytes BE) || 4 or 16 address bytes."""
    if family == ADDR_V4:
        want = 4
    elif family == ADDR_V6:
        want = 16
    else:
        raise ValueError("address family must be 4 or 6, got %r" % (family,))
    if len(addr) != want:
        raise ValueError("an IPv%d address is %d bytes, got %d" % (family, want, len(addr)))
    if port < 0 or port > 0xFFFF:
        raise ValueError("port must be in 0..65535, got %r" % (port,))
    return bytes((family, port >> 8, port & 0xFF)) + bytes(addr)
