"""Device configuration: load and validate (docs/CONFIG.md, "Device").

A config problem is one clear line naming the file, the field and what is
expected, raised as ConfigError; the firmware logs it and stays in safe
mode instead of crashing in a loop.

A device reads its config once per boot. The result is a `Settings` object
with plain attributes and no methods, so holding it keeps none of this
module's code alive: the firmware calls `forget()` after loading and the
validation code leaves the heap (docs/MEMORY.md).
"""
import json

from microtun.paths import POLICIES


class ConfigError(ValueError):
    pass


def key_field(cfg, where, name, optional=False):
    v = cfg.get(name)
    if v is None:
        if optional:
            return None
        raise ConfigError("%s%s: missing; expected 64 hex characters (a 32-byte key)" % (where, name))
    if not isinstance(v, str) or len(v) != 64:
        raise ConfigError("%s%s: expected 64 hex characters (a 32-byte key), got %s" % (
            where, name, ("%d characters" % len(v)) if isinstance(v, str) else type(v).__name__))
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise ConfigError("%s%s: expected 64 hex characters (a 32-byte key), got non-hex text" % (where, name))


def int_field(cfg, where, name, lo, hi, default=None):
    v = cfg.get(name, default)
    if v is None:
        raise ConfigError("%s%s: missing; expected an integer from %d to %d" % (where, name, lo, hi))
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError("%s%s: expected an integer from %d to %d, got %r" % (where, name, lo, hi, v))
    return v


def str_field(cfg, where, name, default=None):
    v = cfg.get(name, default)
    if not isinstance(v, str) or not v:
        raise ConfigError("%s%s: %s; expected a non-empty string" % (
            where, name, "missing" if v is None else "got %r" % (v,)))
    return v


def _object(cfg, where, name, what):
    v = cfg.get(name)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError("%s%s: expected an object (%s), got %r" % (where, name, what, v))
    return v


def parse_hostport(text, where):
    """'host:port' or '[v6]:port' -> (host, port)."""
    if not isinstance(text, str):
        raise ConfigError("%s: expected \"host:port\", got %r" % (where, text))
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]:")
    else:
        host, sep, rest = text.rpartition(":")
    if not sep or not host:
        raise ConfigError("%s: expected \"host:port\" (IPv6 as \"[addr]:port\"), got %r" % (where, text))
    try:
        port = int(rest)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ConfigError("%s: port must be 1..65535, got %r" % (where, rest))
    return host, port


class Settings:
    """Validated settings, as attributes. A device config: name,
    private_key, gateway_public, psk (or None), paths (a list of Settings
    with name, pop (host, port), label, rx_label, hop_key), policy,
    channels (a tuple, or None: all), nat_keepalive_ms, window, state_dir, network (board-specific dict, e.g.
    Wi-Fi), app (free dict for the application), watchdog_ms (0 = off),
    unresponsive_ms (0 = the timer default), ops (the operations channel allowed: docs/OPS.md),
    source (where it was read from)."""


def _path(d, where):
    s = Settings()
    s.name = str_field(d, where, "name")
    s.pop = parse_hostport(d.get("pop"), where + "pop")
    s.label = int_field(d, where, "label", 1, 0xFFFFFF)
    s.rx_label = int_field(d, where, "rx_label", 1, 0xFFFFFF)
    s.hop_key = key_field(d, where, "hop_key")
    return s


def _channels(v, w):
    """The app channels the gateway lets this device use: a tuple, or None
    (the config does not say: every channel)."""
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 255
                                          for c in v):
        raise ConfigError("%schannels: expected a list of channel numbers 1..255, got %r" % (w, v))
    return tuple(v)


def from_dict(d, source="config"):
    """Validate a decoded device config; a Settings, or ConfigError."""
    if not isinstance(d, dict):
        raise ConfigError("%s: expected a JSON object at the top level" % source)
    w = source + ": "
    s = Settings()
    s.source = source
    s.name = str_field(d, w, "name")
    s.private_key = key_field(d, w, "private_key")
    s.gateway_public = key_field(d, w, "gateway_public_key")
    s.psk = key_field(d, w, "psk", optional=True)
    paths = d.get("paths")
    if not isinstance(paths, list) or not paths:
        raise ConfigError("%spaths: expected a non-empty list of paths" % w)
    if len(paths) > 8:
        raise ConfigError("%spaths: at most 8 paths, got %d" % (w, len(paths)))
    s.paths = []
    for i, p in enumerate(paths):
        if not isinstance(p, dict):
            raise ConfigError("%spaths[%d]: expected an object" % (w, i))
        s.paths.append(_path(p, "%spaths[%d]." % (w, i)))
    rx = [p.rx_label for p in s.paths]
    for i, lbl in enumerate(rx):
        if lbl in rx[:i]:
            raise ConfigError("%spaths[%d].rx_label: %d is used by another path; each path needs its own" % (w, i, lbl))
    s.policy = d.get("policy", "best")
    if s.policy not in POLICIES:
        raise ConfigError("%spolicy: expected one of %s, got %r" % (w, ", ".join(POLICIES), s.policy))
    s.channels = _channels(d.get("channels"), w)
    s.nat_keepalive_ms = int_field(d, w, "nat_keepalive_s", 5, 3600, 25) * 1000
    s.window = int_field(d, w, "window", 64, 65536, 1024)
    s.state_dir = d.get("state_dir", ".")
    if not isinstance(s.state_dir, str):
        raise ConfigError("%sstate_dir: expected a directory path string" % w)
    s.network = _object(d, w, "network", "board network settings")
    s.app = _object(d, w, "app", "application settings")
    s.watchdog_ms = int_field(d, w, "watchdog_s", 0, 3600, 0) * 1000
    # 0: the default (15 s); a gateway with a standby wants ~2 s (docs/DEPLOY.md "Many cores and failover")
    s.unresponsive_ms = int_field(d, w, "unresponsive_s", 0, 60, 0) * 1000
    s.ops = d.get("ops", False)         # the operations channel (docs/OPS.md): off unless provisioned
    if s.ops not in (True, False):
        raise ConfigError("%sops: expected true or false, got %r" % (w, s.ops))
    return s


def load(path):
    """Read and validate a device config file; raises ConfigError."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        raise ConfigError("%s: cannot read the file; provision one with `microtun provision` and copy it to the device" % path)
    return loads(text, path)


def loads(text, source="config"):
    try:
        d = json.loads(text)
    except ValueError as e:
        raise ConfigError("%s: not valid JSON (%s)" % (source, e))
    return from_dict(d, source)


def forget():
    """Take this module out of sys.modules and the package, so that its code
    leaves the heap once the caller drops its own references (ConfigError,
    load): a device validates its config once per boot. Importing it again
    loads it again."""
    import sys
    import microtun
    sys.modules.pop(__name__, None)
    if getattr(microtun, "config", None) is not None:
        del microtun.config
