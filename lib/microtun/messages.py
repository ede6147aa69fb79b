"""Inner tunnel wire formats (docs/PROTOCOL.md, "Inner messages").

All integers are big-endian. Every message starts with a type byte and three
zero bytes. Sizes:

    INIT       148 bytes   type|0|sender|e(32)|enc_s(48)|enc_fresh(28)|mac1|mac2
    RESPONSE    92 bytes   type|0|sender|receiver|e(32)|enc_empty(16)|mac1|mac2
    COOKIE      52 bytes   type|0|receiver|nonce(12)|enc_cookie(32)
    TRANSPORT  32+ bytes   type|0|receiver|counter(8)|ciphertext|tag(16)

mac1 and mac2 follow WireGuard (whitepaper §5.4.4) with HMAC-SHA256 truncated
to 16 bytes in place of keyed BLAKE2s: mac1 is keyed by the responder's static
public key, so junk is dropped before any DH; mac2 is keyed by a cookie and is
only required while the responder is under load.
"""
import hashlib

from microtun.hmac import hmac_sha256, ct_equal

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

# Wire constants.
TYPE_INIT = const(1)
TYPE_RESPONSE = const(2)
TYPE_COOKIE = const(3)
TYPE_TRANSPORT = const(4)

INIT_LEN = const(148)
RESPONSE_LEN = const(92)
COOKIE_LEN = const(52)
TRANSPORT_HEADER_LEN = const(16)
TAG_LEN = const(16)
TRANSPORT_MIN_LEN = const(32)
MAC_LEN = const(16)
FRESHNESS_LEN = const(12)
COOKIE_NONCE_LEN = const(12)

# Offsets of the Noise message inside INIT / RESPONSE, and of the MACs.
INIT_NOISE = const(8)
INIT_MAC1 = const(116)
INIT_MAC2 = const(132)
RESP_NOISE = const(12)
RESP_MAC1 = const(60)
RESP_MAC2 = const(76)

# Domain separation (the Noise prologue and the MAC key labels).
PROLOGUE = b"microtun v1"
_LABEL_MAC1 = b"mac1----"
_LABEL_COOKIE = b"cookie--"


def mac1_key(responder_public):
    return hashlib.sha256(_LABEL_MAC1 + responder_public).digest()


def cookie_key(responder_public):
    return hashlib.sha256(_LABEL_COOKIE + responder_public).digest()


def mac(key, data):
    return hmac_sha256(key, data)[:MAC_LEN]


def header(msg_type):
    return bytes((msg_type, 0, 0, 0))


def u32(b, off):
    return int.from_bytes(b[off:off + 4], "big")


def message_type(data):
    """The message type of a datagram, or 0 if it cannot be one of ours
    (too short, reserved bytes not zero, unknown type, wrong length)."""
    n = len(data)
    if n < 4 or data[1] or data[2] or data[3]:
        return 0
    t = data[0]
    if t == TYPE_TRANSPORT:
        return t if n >= TRANSPORT_MIN_LEN else 0
    if t == TYPE_INIT:
        return t if n == INIT_LEN else 0
    if t == TYPE_RESPONSE:
        return t if n == RESPONSE_LEN else 0
    if t == TYPE_COOKIE:
        return t if n == COOKIE_LEN else 0
    return 0


def check_mac(key, data, end):
    """True if the 16 bytes at data[end:end+16] are the MAC of data[:end]."""
    return ct_equal(mac(key, data[:end]), data[end:end + MAC_LEN])


def finish(body, mac1k, cookie):
    """Append mac1 (and mac2 if we hold a cookie, else zeros) to a handshake
    message body. Returns (message, mac1)."""
    m1 = mac(mac1k, body)
    msg = body + m1
    if cookie is None:
        return msg + bytes(MAC_LEN), m1
    return msg + mac(cookie, msg), m1
