"""Timer constants and the small yes/no rules that drive a session
(docs/PROTOCOL.md, "Timers"). Times are ms; compare only via ticks_diff.

WireGuard's values (whitepaper §6.1, wireguard-go device/constants.go) are
given next to ours. Ours differ where an idle battery-powered device pays for
every packet: a sensor that reports once a minute should not run a handshake
(~270 bytes on the air and four X25519 on the MCU) every two minutes.

The constants are private (`const`: free on a board); every one is a
Params default below, which is where the gateway's config reads them.
"""
from microtun.ticks import ticks_diff

if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

# --- specification-level constants (WireGuard value in the comment) --------
_REKEY_AFTER_MESSAGES = const(1 << 60)   # same as WireGuard
_REKEY_AFTER_TIME_MS = const(1800000)    # WG 120 s; ours 30 min: forward-secrecy window vs airtime
_REJECT_AFTER_TIME_MS = const(2100000)   # WG 180 s (= rekey + 60 s); ours rekey + 5 min
_REKEY_TIMEOUT_MS = const(5000)          # WG 5 s: first handshake retry
_REKEY_TIMEOUT_JITTER_MS = const(333)    # WG 0..333 ms
_MAX_RETRY_INTERVAL_MS = const(60000)    # WG retries every 5 s for 90 s, then gives up; we back
                                         # off 5, 10, 20, 40, 60, 60 s ... and never give up
_KEEPALIVE_TIMEOUT_MS = const(10000)     # WG 10 s passive keepalive
_INIT_MIN_INTERVAL_MS = const(20)        # WG: at most 50 initiations/s accepted per peer
_UNDER_LOAD_PER_S = const(50)            # responder: initiations/s before mac2 (cookie) is required


class Params:
    """Per-endpoint timer settings: the constants above, overridable (tests
    use short ones; a gateway may choose a shorter rekey). The defaults are
    class attributes, so a Params costs a board nothing until one is set."""
    rekey_after_ms = _REKEY_AFTER_TIME_MS
    reject_after_ms = _REJECT_AFTER_TIME_MS
    rekey_after_messages = _REKEY_AFTER_MESSAGES
    rekey_timeout_ms = _REKEY_TIMEOUT_MS
    jitter_ms = _REKEY_TIMEOUT_JITTER_MS
    max_retry_ms = _MAX_RETRY_INTERVAL_MS
    keepalive_ms = _KEEPALIVE_TIMEOUT_MS
    persistent_keepalive_ms = 0      # 0 = off; the path layer keeps NATs open
    init_min_interval_ms = _INIT_MIN_INTERVAL_MS
    under_load_per_s = _UNDER_LOAD_PER_S
    keep_session = True              # initiator: rekey even when idle
    queue_len = 16                   # app messages held while no session
    unresponsive_ms = 0              # data unanswered this long -> new handshake; 0: keepalive + rekey timeout

    def __init__(self, **kw):
        for k in kw:
            if not hasattr(self, k):
                raise ValueError("unknown timer parameter %r" % k)
            setattr(self, k, kw[k])


def retry_interval(params, n, r):
    """Delay before handshake attempt number n + 1 (n >= 1); r: a random
    u32 for the jitter."""
    d = params.rekey_timeout_ms << min(n - 1, 5)
    if d > params.max_retry_ms:
        d = params.max_retry_ms
    return d + r % (params.jitter_ms + 1)


def should_retry_handshake(s, now):
    """An initiation is outstanding and its retry time has come."""
    return s.hs is not None and ticks_diff(now, s.hs_retry_at) >= 0


def should_rekey_on_send(s, now, params):
    """Initiator, about to send: the current keypair is old or worn."""
    kp = s.current
    return (kp is not None and kp.initiator and s.hs is None and
            (ticks_diff(now, kp.created) >= params.rekey_after_ms or kp.send_counter >= params.rekey_after_messages))


def should_rekey_on_timer(s, now, params):
    """Initiator with no handshake in flight, at a timer: a new handshake is
    due because (one function for three rules: each is a board's heap)
    - idle: it keeps its session up while idle (keep_session), so the far
      end can reach it, and the keypair is REKEY_AFTER_TIME old;
    - on receive: the keypair is about to be rejected (WG: reject -
      keepalive - rekey timeout);
    - unresponsive: it sent data and heard nothing back for
      unresponsive_after(params): the far end may have lost our session
      (e.g. it restarted)."""
    if s.hs is not None:
        return False
    kp = s.current
    if kp is not None and kp.initiator:
        age = ticks_diff(now, kp.created)
        if params.keep_session and age >= params.rekey_after_ms:
            return True
        if age >= params.reject_after_ms - params.keepalive_ms - params.rekey_timeout_ms:
            return True
    return s.data_sent_unanswered is not None and ticks_diff(now, s.data_sent_unanswered) >= unresponsive_after(params)


def should_send_keepalive(s, now, params):
    """A keepalive is owed: passive (we received data and have sent nothing
    back for KEEPALIVE_TIMEOUT), or persistent (persistent_keepalive_ms,
    off by default: the path layer keeps NATs open)."""
    if s.current is None:
        return False
    if s.keepalive_due is not None and ticks_diff(now, s.keepalive_due) >= 0:
        return True
    return params.persistent_keepalive_ms > 0 and ticks_diff(now, s.last_sent) >= params.persistent_keepalive_ms


def unresponsive_after(params):
    """How long data may go unanswered before the initiator re-handshakes:
    WireGuard's keepalive + rekey timeout (15 s), or a device's shorter
    `unresponsive_s` when its gateway has a standby (docs/DEPLOY.md): the
    gateway's own keepalive_s must then be shorter still."""
    return params.unresponsive_ms or params.keepalive_ms + params.rekey_timeout_ms


def is_expired(keypair, now, params):
    return ticks_diff(now, keypair.created) >= params.reject_after_ms
