"""Validation helpers shared by every host config (PoP, gateway, device,
provisioner): read a JSON file and walk it field by field, turning every
problem into ONE line that names the file, the field path and what was
expected:

    pop.json: routes[2].in_key: expected 64 hex characters (a 32-byte key), got 10 characters

Usage (a schema is plain code, read top to bottom):

    root = config.load("pop.json")              # a Node for the top-level object
    name = root.text("name")
    listen = root.address("listen")
    for r in root.objects("routes", min_len=1):
        label = r.integer("in_label", 1, 0xFFFFFF)
        key = r.key32("in_key")
        r.only("in_label", "in_key", ...)       # reject typos like "in_lable"

Every helper raises ConfigError; callers print str(e) and exit with status 2.
Fields whose names start with "_" are comments and are always allowed.
"""
import ipaddress
import json

_MISSING = object()


class ConfigError(Exception):
    """One line: '<file>: <field path>: <what is wrong, what was expected>'."""


def _kind(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return "the integer %d" % v
    if isinstance(v, float):
        return "the number %r" % v
    if isinstance(v, str):
        return "the string %s" % _short(v)
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _short(s, limit=40):
    r = json.dumps(s)
    return r if len(r) <= limit else r[:limit - 4] + '..."'


class Address:
    """A numeric socket address from a config: family 4 or 6, host text
    without brackets, port. str() gives back the config form."""

    __slots__ = ("family", "host", "port")

    def __init__(self, family, host, port):
        self.family = family
        self.host = host
        self.port = port

    @property
    def sockaddr(self):
        return (self.host, self.port)

    @property
    def is_loopback(self):
        return ipaddress.ip_address(self.host).is_loopback

    def __eq__(self, other):
        return isinstance(other, Address) and (self.family, self.host, self.port) == (
            other.family, other.host, other.port)

    def __hash__(self):
        return hash((self.family, self.host, self.port))

    def __str__(self):
        return ("[%s]:%d" if self.family == 6 else "%s:%d") % (self.host, self.port)

    __repr__ = __str__


ADDRESS_FORMS = "\"a.b.c.d:port\" or \"[IPv6]:port\""


def parse_address(text):
    """Address from 'a.b.c.d:port' or '[v6]:port' (numeric only), or None."""
    if not isinstance(text, str):
        return None
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1:close + 2] != ":":
            return None
        host, port = text[1:close], text[close + 2:]
        family = 6
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            return None
        family = 4
    if not port.isdigit() or not (0 <= int(port) <= 65535) or len(port) > 5:
        return None
    try:
        ip = ipaddress.IPv6Address(host) if family == 6 else ipaddress.IPv4Address(host)
    except ValueError:
        return None
    return Address(family, str(ip), int(port))


def format_sockaddr(sa):
    """A socket's (host, port[, flow, scope]) tuple as 'a.b.c.d:p' / '[v6]:p'."""
    host, port = sa[0], sa[1]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def read_text(path, kind):
    """The UTF-8 text of a config file; ConfigError names the file when it
    cannot be read or is not UTF-8 (kind: "JSON", "TOML", for the message)."""
    name = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError("%s: cannot read: %s" % (name, e.strerror or e)) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("%s: not valid %s: not UTF-8 text (byte %d)" % (name, kind, e.start)) from None


def load(path):
    """The top-level JSON object of the file at path, as a Node."""
    name = str(path)
    text = read_text(path, "JSON")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("%s: not valid JSON: %s (line %d, column %d)" % (name, e.msg, e.lineno, e.colno)) from None
    if not isinstance(value, dict):
        raise ConfigError("%s: top level: expected a JSON object {...}, got %s" % (name, _kind(value)))
    return Node(name, "", value)


class Node:
    """A JSON object at a field path inside a config file."""

    def __init__(self, file, path, value):
        self.file = file
        self.path = path
        self.value = value

    # --- errors -------------------------------------------------------------
    def where(self, key=None):
        if key is None:
            return self.path or "top level"
        return "%s.%s" % (self.path, key) if self.path else str(key)

    def error(self, key, message):
        """A ConfigError naming this file and field (key None: this object)."""
        return ConfigError("%s: %s: %s" % (self.file, self.where(key), message))

    # --- raw access ---------------------------------------------------------
    def has(self, key):
        return key in self.value

    def raw(self, key, expected, default=_MISSING):
        if key in self.value:
            return self.value[key]
        if default is _MISSING:
            raise self.error(key, "missing (expected %s)" % expected)
        return default

    def only(self, *allowed):
        """Reject fields not in allowed (typos); '_'-prefixed ones are comments."""
        for k in self.value:
            if k not in allowed and not k.startswith("_"):
                raise self.error(k, "unknown field (expected one of: %s; start a field name with \"_\" "
                                    "for a comment)" % ", ".join(allowed))

    # --- typed fields ---------------------------------------------------------
    def text(self, key, default=_MISSING, choices=None, nonempty=True):
        what = ("one of %s" % ", ".join(json.dumps(c) for c in choices)) if choices else "a string"
        v = self.raw(key, what, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, str):
            raise self.error(key, "expected %s, got %s" % (what, _kind(v)))
        if choices and v not in choices:
            raise self.error(key, "expected %s, got %s" % (what, _short(v)))
        if nonempty and not v.strip():
            raise self.error(key, "expected a non-empty string")
        return v

    def integer(self, key, lo, hi, default=_MISSING):
        what = "an integer in %d..%d" % (lo, hi)
        v = self.raw(key, what, default)
        if v is default and default is not _MISSING:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(key, "expected %s, got %s" % (what, _kind(v)))
        if not lo <= v <= hi:
            raise self.error(key, "expected %s, got %d" % (what, v))
        return v

    def number(self, key, lo, hi, default=_MISSING):
        what = "a number in %g..%g" % (lo, hi)
        v = self.raw(key, what, default)
        if v is default and default is not _MISSING:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.error(key, "expected %s, got %s" % (what, _kind(v)))
        if not lo <= v <= hi:
            raise self.error(key, "expected %s, got %g" % (what, v))
        return v

    def hexbytes(self, key, length, what=None):
        """Exactly `length` bytes written as 2*length hex characters."""
        what = what or "%d bytes" % length
        want = "%d hex characters (%s)" % (2 * length, what)
        v = self.raw(key, want)
        if not isinstance(v, str):
            raise self.error(key, "expected %s, got %s" % (want, _kind(v)))
        if len(v) != 2 * length:
            raise self.error(key, "expected %s, got %d characters" % (want, len(v)))
        for i, c in enumerate(v):
            if c not in "0123456789abcdefABCDEF":
                raise self.error(key, "expected %s, got %r at position %d" % (want, c, i + 1))
        return bytes.fromhex(v)

    def key32(self, key):
        return self.hexbytes(key, 32, "a 32-byte key")

    def address(self, key, default=_MISSING, loopback=False):
        want = ("a loopback address " if loopback else "") + ADDRESS_FORMS
        v = self.raw(key, want, default)
        if v is default and default is not _MISSING:
            return v
        a = parse_address(v)
        if a is None:
            raise self.error(key, "expected %s with a numeric address, got %s" % (want, _kind(v)))
        if loopback and not a.is_loopback:
            raise self.error(key, "expected a loopback address (127.0.0.0/8 or [::1]), got %s" % _short(v))
        return a

    def obj(self, key, default=_MISSING):
        v = self.raw(key, "an object {...}", default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, dict):
            raise self.error(key, "expected an object {...}, got %s" % _kind(v))
        return Node(self.file, self.where(key), v)

    def items(self, key, min_len=0, default=_MISSING):
        """The list at key, as a list of raw values."""
        v = self.raw(key, "a list [...]", default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, list):
            raise self.error(key, "expected a list [...], got %s" % _kind(v))
        if len(v) < min_len:
            raise self.error(key, "expected at least %d entr%s, got %d" % (min_len, "y" if min_len == 1 else "ies", len(v)))
        return v

    def objects(self, key, min_len=0, default=_MISSING):
        """The list of objects at key, as Nodes with paths like 'routes[2]'."""
        v = self.items(key, min_len, default)
        if v is default and default is not _MISSING:
            return v
        out = []
        for i, item in enumerate(v):
            path = "%s[%d]" % (self.where(key), i)
            if not isinstance(item, dict):
                raise ConfigError("%s: %s: expected an object {...}, got %s" % (self.file, path, _kind(item)))
            out.append(Node(self.file, path, item))
        return out
