"""Building and reading the INIT and RESPONSE messages: the Noise IKpsk2
handshake (microtun.noise) framed with indexes and mac1/mac2 (microtun.messages).

Noise_IKpsk2_25519_AESCCM_SHA256, prologue "microtun v1":
    INIT      -> e, es, s, ss        payload: 12-byte freshness value
    RESPONSE  <- e, ee, se, psk      payload: empty
"""
from microtun.noise import HandshakeState, NoiseError, NOISE_IKPSK2_25519_AESCCM_SHA256
from microtun import messages as m

SUITE = NOISE_IKPSK2_25519_AESCCM_SHA256
_NO_PSK = bytes(32)


def create_initiation(static, peer_public, psk, sender_index, freshness, mac1k, cookie, ss=None, suite=SUITE):
    """Returns (HandshakeState, message, mac1)."""
    hs = HandshakeState(suite, True, static, rs=peer_public, psk=psk, prologue=m.PROLOGUE, ss=ss)
    body = m.header(m.TYPE_INIT) + sender_index.to_bytes(4, "big") + hs.write_message(freshness)
    msg, mac1 = m.finish(body, mac1k, cookie)
    return hs, msg, mac1


def read_initiation(data, static, ss_lookup, suite=SUITE):
    """Decrypt an INIT whose mac1 was already checked. Returns
    (HandshakeState, sender_index, freshness); raises NoiseError."""
    hs = HandshakeState(suite, False, static, prologue=m.PROLOGUE, ss_lookup=ss_lookup)
    fresh = hs.read_message(data[m.INIT_NOISE:m.INIT_MAC1])
    if len(fresh) != m.FRESHNESS_LEN:
        raise NoiseError("initiation payload is not a freshness value")
    return hs, m.u32(data, 4), fresh


def create_response(hs, psk, sender_index, receiver_index, mac1k, cookie):
    """Responder: returns the RESPONSE message (hs must have read INIT).
    psk None means no pre-shared key (32 zero bytes, as on the initiator)."""
    hs.set_psk(psk if psk is not None else _NO_PSK)
    body = (m.header(m.TYPE_RESPONSE) + sender_index.to_bytes(4, "big") +
            receiver_index.to_bytes(4, "big") + hs.write_message(b""))
    return m.finish(body, mac1k, cookie)[0]


def read_response(hs, data):
    """Initiator: raises NoiseError if the RESPONSE does not authenticate."""
    payload = hs.read_message(data[m.RESP_NOISE:m.RESP_MAC1])
    if payload:
        raise NoiseError("unexpected response payload")
    return m.u32(data, 4)
