"""STALE: the gateway's answer to an authentic INIT whose freshness is not
above the last one it accepted from that device (docs/PROTOCOL.md §2.5, §5).

    type=5|0|0|0 | receiver index (the INIT's sender index) | nonce(12) |
    AES-256-CCM(stale_key, nonce, the gateway's last freshness value, aad = bytes 0..7)

stale_key comes from the chaining key and handshake hash of that very INIT
after `ss` and its payload, so only the gateway (its static key, for `es`)
and the INIT's sender (its ephemeral key) can make or open it. The device
jumps its boot counter past the value and handshakes again at once.

A device imports this module only when a STALE message arrives (rare: its
boot counter went backwards), so it costs a board no heap until then.
"""
from microtun import messages as m
from microtun.aead import AEAD
from microtun.hmac import hmac_sha256


def stale_key(ck, h):
    return hmac_sha256(ck, b"stale---", h)


def seal_stale(ck, h, receiver_index, value, nonce):
    """Gateway: the 48-byte STALE message naming `value` (12 bytes)."""
    head = m.header(m.TYPE_STALE) + receiver_index.to_bytes(4, "big")
    return head + nonce + AEAD(stale_key(ck, h)).seal(nonce, value, head)


def open_stale(ck, h, data):
    """Device: the freshness value a STALE message names, or None if it was
    not made by the gateway for the INIT whose ck and h are given. The
    caller checked the type and the receiver index. Never raises."""
    v = AEAD(stale_key(ck, h)).open(data[8:20], data[20:m.STALE_LEN], data[:8])
    return v if v is not None and len(v) == m.FRESHNESS_LEN else None


def jump(fresh, value):
    """The gateway holds `value` (12 bytes) as our last freshness: make the
    microtun.freshness.Freshness `fresh` go on from the boot counter after
    value's, uptime 0. Returns the new boot counter, or None if value's
    counter is below ours (ours is ahead already: nothing to pass) or is
    the last one (re-provision the device's keys)."""
    b = int.from_bytes(value[:4], "big")
    if b < fresh.boot or b >= 0xFFFFFFFF:
        return None
    fresh.boot = b + 1
    fresh._uptime = 0
    fresh._last_value = -1
    return fresh.boot


def device_in(dev, data, addr, now):
    """A STALE for the INIT a microtun.endpoint.Device has in flight (it
    checked the index): jump past the value it names, tell the app (a STALE
    event) and handshake again at once; counted bad_stale if it does not
    authenticate. The device's rare path, here so that its code stays out
    of the device's heap until a STALE comes."""
    from microtun.endpoint import Event, STALE
    s = dev.session
    v = open_stale(s.hs.ck, s.hs.h, data)
    if v is None or jump(dev._fresh, v) is None:
        dev._count("bad_stale")
        return
    dev._count("stale_rx")
    dev._events.append(Event(STALE, s, None, v, addr))
    s.hs_attempts = 0
    dev._initiate(now)
