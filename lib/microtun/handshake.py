"""The initiator's half of the handshake: building INIT and reading
RESPONSE, the Noise IKpsk2 handshake (microtun.noise) framed with indexes
and mac1/mac2 (microtun.messages). The responder's half (reading INIT,
building RESPONSE) is in microtun.responder, which a device never loads.

Noise_IKpsk2_25519_AESCCM_SHA256, prologue "microtun v1":
    INIT      -> e, es, s, ss        payload: 12-byte freshness value
    RESPONSE  <- e, ee, se, psk      payload: empty
"""
from microtun.noise import HandshakeState, NoiseError, NOISE_IKPSK2_25519_AESCCM_SHA256
from microtun import messages as m

SUITE = NOISE_IKPSK2_25519_AESCCM_SHA256


def create_initiation(static, peer_public, psk, sender_index, freshness, mac1k, cookie, ss=None, suite=SUITE):
    """Returns (HandshakeState, message, mac1)."""
    hs = HandshakeState(suite, True, static, rs=peer_public, psk=psk, prologue=m.PROLOGUE, ss=ss)
    body = m.header(m.TYPE_INIT) + sender_index.to_bytes(4, "big") + hs.write_message(freshness)
    msg, mac1 = m.finish(body, mac1k, cookie)
    return hs, msg, mac1


def read_response(hs, data):
    """Initiator: raises NoiseError if the RESPONSE does not authenticate."""
    payload = hs.read_message(data[m.RESP_NOISE:m.RESP_MAC1])
    if payload:
        raise NoiseError("unexpected response payload")
    return m.u32(data, 4)
