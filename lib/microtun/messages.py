"""Inner tunnel wire formats (docs/PROTOCOL.md, "Inner messages").

All integers are big-endian. Every message starts with a type byte and three
zero bytes. Sizes:

    INIT       148 bytes   type|0|sender|e(32)|enc_s(48)|enc_fresh(28)|mac1|mac2
    RESPONSE    92 bytes   type|0|sender|receiver|e(32)|enc_empty(16)|mac1|mac2
    COOKIE      52 bytes   type|0|receiver|nonce(12)|enc_cookie(32)
    TRANSPORT  32+ bytes   type|0|receiver|counter(8)|ciphertext|tag(16)
    STALE       48 bytes   type|0|receiver|nonce(12)|enc_freshness(28)

mac1 and mac2 follow WireGuard (whitepaper §5.4.4) with HMAC-SHA256 truncated
to 16 bytes in place of keyed BLAKE2s: mac1 is keyed by the responder's static
public key, so junk is dropped before any DH; mac2 is keyed by a cookie and is
only required while the responder is under load.
"""
import hashlib

import microtun.hmac as hmac   # (the `import x.y as z` form: endpoint.py says why)

if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

# Wire constants. Those no other module needs are private (const: free on
# a board).
TYPE_INIT = const(1)
TYPE_RESPONSE = const(2)
TYPE_COOKIE = const(3)
TYPE_TRANSPORT = const(4)
TYPE_STALE = const(5)              # "your freshness is behind": answers an INIT (docs/PROTOCOL.md §2.5)

INIT_LEN = const(148)
_RESPONSE_LEN = const(92)
_COOKIE_LEN = const(52)
STALE_LEN = const(48)
_TRANSPORT_HEADER_LEN = const(16)
TRANSPORT_MIN_LEN = const(32)      # header and tag: an empty plaintext is a keepalive
MAC_LEN = const(16)
FRESHNESS_LEN = const(12)
COOKIE_NONCE_LEN = const(12)

# Offsets of the Noise message inside INIT / RESPONSE, and of the MACs.
INIT_NOISE = const(8)
INIT_MAC1 = const(116)
INIT_MAC2 = const(132)
RESP_NOISE = const(12)
RESP_MAC1 = const(60)

# Domain separation: the Noise prologue (mac1's key label is below, the
# cookie key's in microtun.cookie).
PROLOGUE = const(b"microtun v1")


def mac1_key(key):
    """mac1's key: HASH("mac1----" || the responder's static public key)."""
    return hashlib.sha256(b"mac1----" + key).digest()


def header(t):
    return bytes((t, 0, 0, 0))


def u32(data, off):
    return int.from_bytes(data[off:off + 4], "big")


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
        return t if n == _RESPONSE_LEN else 0
    if t == TYPE_COOKIE:
        return t if n == _COOKIE_LEN else 0
    if t == TYPE_STALE:
        return t if n == STALE_LEN else 0
    return 0


def check_mac(key, data, end):
    """True if the 16 bytes at data[end:end+16] are the MAC of data[:end]."""
    return hmac.ct_equal(hmac.hmac_sha256(key, data[:end])[:MAC_LEN], data[end:end + MAC_LEN])


def finish(data, key, cookie, mac=hmac.hmac_sha256):
    """Append mac1 (under key) and mac2 (under the cookie if we hold one,
    else zeros) to a handshake message body. Returns (message, mac1).
    mac: the HMAC-SHA256 function (a crypto backend's, microtun.crypto)."""
    m1 = mac(key, data)[:MAC_LEN]
    data += m1
    if cookie is None:
        return data + bytes(MAC_LEN), m1
    return data + mac(cookie, data)[:MAC_LEN], m1
