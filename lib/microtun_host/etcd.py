"""A small etcd v3 client over etcd's JSON gateway (HTTP/1.1 + JSON, the
gRPC-gateway every etcd v3.4+ server exposes on its client port), and a
throw-away local etcd for tests, benchmarks and demos.

    c = Client(["http://127.0.0.1:2379"])               # user=, password=, ca_file=, cert_file=, key_file=
    c.put("/microtun/head", b"...")
    kvs, rev, more = c.range("/microtun/log/", prefix=True)
    ok = c.txn(compare=[c.cmp_mod_revision("/microtun/head", 7)], success=[c.op_put(k, v)])
    w = c.watch("/microtun/log/", prefix=True, start_revision=rev + 1)
    for events in w:                                     # blocks; w.close() from another thread ends it
        ...
    lease = c.lease_grant(5); c.lease_keepalive(lease)

Why our own ~250 lines rather than a package (docs/FLEET.md, "The client"):
the `etcd3` package (python-etcd3) has had no release since 2020 and breaks
with protobuf >= 4; `etcd3gw` (OpenStack) speaks this same JSON gateway but
brings requests and futurist; the official Go client has no Python twin.
The JSON gateway is a documented, versioned etcd API (`/v3/...`, stable
since etcd 3.4, the version Debian ships), needs no gRPC or protobuf stack,
and what microtun uses of it is seven calls. Keys and values travel as
base64; numbers (revisions, lease ids) as JSON strings.

Every failure is an EtcdError with one line naming the endpoint and what
went wrong; the caller decides to retry.
"""
import base64
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.parse


class EtcdError(Exception):
    """One line: which endpoint, what failed, what to check. `answered`:
    the server replied (an API or auth error), as opposed to no reply."""

    def __init__(self, message, answered=False):
        super().__init__(message)
        self.answered = answered


def _b64(b):
    if isinstance(b, str):
        b = b.encode()
    return base64.b64encode(b).decode()


def _unb64(s):
    return base64.b64decode(s) if s else b""


def prefix_end(key):
    """The range_end that makes [key, end) cover every key starting with key."""
    b = bytearray(key.encode() if isinstance(key, str) else key)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"


class KV:
    __slots__ = ("key", "value", "create_revision", "mod_revision", "lease")

    def __init__(self, d):
        self.key = _unb64(d.get("key")).decode()
        self.value = _unb64(d.get("value"))
        self.create_revision = int(d.get("create_revision", 0))
        self.mod_revision = int(d.get("mod_revision", 0))
        self.lease = int(d.get("lease", 0))


class Watch:
    """A streaming watch: iterate for lists of (kind, KV) events, kind "PUT"
    or "DELETE". Ends (StopIteration) when closed; raises EtcdError when
    the stream breaks or etcd cancels it (e.g. the revision was compacted)."""

    def __init__(self, conn, resp):
        self._conn = conn
        self._resp = resp
        self._closed = False

    def close(self):
        self._closed = True
        try:                # shutdown wakes a reader blocked in another thread
            self._conn.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            pass
        self._conn.close()

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            try:
                line = self._resp.readline()
            except (OSError, http.client.HTTPException, ValueError, AttributeError) as e:
                # AttributeError: http.client's chunked reader after close() from another thread
                if self._closed:
                    raise StopIteration
                raise EtcdError("watch stream broken: %s" % e) from None
            if not line:
                if self._closed:
                    raise StopIteration
                raise EtcdError("watch stream closed by etcd")
            try:
                msg = json.loads(line)
            except ValueError:
                raise EtcdError("watch stream: not JSON: %r" % line[:80]) from None
            if "error" in msg:
                raise EtcdError("watch: %s" % msg["error"].get("message", msg["error"]))
            res = msg.get("result", {})
            if res.get("canceled"):
                raise EtcdError("watch canceled by etcd: %s (compact_revision %s)" % (
                    res.get("cancel_reason", "no reason given"), res.get("compact_revision", "-")))
            events = res.get("events")
            if events:
                return [(e.get("type", "PUT"), KV(e["kv"])) for e in events]


class Client:
    def __init__(self, endpoints, user=None, password=None, ca_file=None, cert_file=None, key_file=None,
                 timeout=2.0):
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ValueError("no etcd endpoints given")
        self.endpoints = []
        for e in endpoints:
            u = urllib.parse.urlsplit(e)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError("etcd endpoint %r: expected http://host:port or https://host:port" % e)
            self.endpoints.append((u.scheme, u.hostname, u.port or 2379))
        self.user = user
        self.password = password
        self.timeout = timeout
        self._ssl = None
        if any(s == "https" for s, _, _ in self.endpoints):
            self._ssl = ssl.create_default_context(cafile=ca_file)
            if cert_file:
                self._ssl.load_cert_chain(cert_file, key_file)
        self._token = None
        self._current = 0           # index of the endpoint that answered last

    def _url(self, i):
        s, h, p = self.endpoints[i]
        return "%s://%s:%d" % (s, h, p)

    def _connect(self, i, timeout):
        s, h, p = self.endpoints[i]
        if s == "https":
            return http.client.HTTPSConnection(h, p, timeout=timeout, context=self._ssl)
        return http.client.HTTPConnection(h, p, timeout=timeout)

    def _headers(self):
        h = {"Content-Type": "application/json"}
        if self._token:
            h["Authorization"] = self._token
        return h

    def _post_once(self, i, path, body, timeout, stream=False):
        conn = self._connect(i, timeout)
        try:
            conn.request("POST", path, json.dumps(body), self._headers())
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise EtcdError("etcd %s: %s" % (self._url(i), getattr(e, "strerror", None) or e or type(e).__name__)) from None
        if stream and resp.status == 200:
            return conn, resp
        data = resp.read()
        conn.close()
        try:
            msg = json.loads(data) if data else {}
        except ValueError:
            msg = {"message": data[:120].decode("utf-8", "replace")}
        if resp.status != 200:
            text = msg.get("message") or msg.get("error") or "HTTP %d" % resp.status
            raise EtcdError("etcd %s%s: %s" % (self._url(i), path, text), answered=True)
        return msg

    def _post(self, path, body, timeout=None, stream=False):
        """POST to the endpoint that answered last, then the others; logs in
        (and again when the token expires) when a user is set."""
        timeout = self.timeout if timeout is None else timeout
        errors = []
        n = len(self.endpoints)
        for k in range(n):
            i = (self._current + k) % n
            try:
                if self.user and self._token is None:
                    self._authenticate(i, timeout)
                try:
                    r = self._post_once(i, path, body, timeout, stream)
                except EtcdError as e:
                    if e.answered and self.user and "token" in str(e).lower():
                        self._token = None
                        self._authenticate(i, timeout)
                        r = self._post_once(i, path, body, timeout, stream)
                    else:
                        raise
                self._current = i
                return r
            except EtcdError as e:
                errors.append(str(e))
                if e.answered:
                    raise       # the server answered: an API or auth error, not a dead endpoint
        raise EtcdError("; ".join(errors))

    def _authenticate(self, i, timeout):
        msg = self._post_once(i, "/v3/auth/authenticate", {"name": self.user, "password": self.password or ""},
                              timeout)
        self._token = msg.get("token")
        if not self._token:
            raise EtcdError("etcd %s: auth: no token for user %r" % (self._url(i), self.user))

    # --- kv ----------------------------------------------------------------------
    def range(self, key, prefix=False, limit=0, min_create_revision=0, revision=0, sort_create=False):
        """([KV], header revision, more)."""
        body = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        if limit:
            body["limit"] = limit
        if min_create_revision:
            body["min_create_revision"] = min_create_revision
        if revision:
            body["revision"] = revision
        if sort_create:
            body["sort_target"] = "CREATE"
            body["sort_order"] = "ASCEND"
        r = self._post("/v3/kv/range", body)
        return [KV(d) for d in r.get("kvs", [])], int(r["header"]["revision"]), bool(r.get("more"))

    def get(self, key):
        kvs, _, _ = self.range(key)
        return kvs[0] if kvs else None

    def put(self, key, value, lease=0):
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self._post("/v3/kv/put", body)["header"]["revision"])

    def delete(self, key, prefix=False):
        body = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        return int(self._post("/v3/kv/deleterange", body).get("deleted", 0))

    @staticmethod
    def cmp_mod_revision(key, rev):
        """Compare: key's last modification is revision rev (0: key absent)."""
        return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(rev)}

    @staticmethod
    def op_put(key, value):
        return {"request_put": {"key": _b64(key), "value": _b64(value)}}

    def txn(self, compare, success):
        """(True when every compare held and success ran, the store's revision after it)."""
        r = self._post("/v3/kv/txn", {"compare": compare, "success": success})
        return bool(r.get("succeeded")), int(r["header"]["revision"])

    # --- leases ----------------------------------------------------------------------
    def lease_grant(self, ttl):
        return int(self._post("/v3/lease/grant", {"TTL": ttl})["ID"])

    def lease_keepalive(self, lease):
        """The remaining TTL (0: the lease is gone)."""
        r = self._post("/v3/lease/keepalive", {"ID": str(lease)})
        return int(r.get("result", {}).get("TTL", 0))

    def lease_revoke(self, lease):
        self._post("/v3/lease/revoke", {"ID": str(lease)})

    # --- watch -----------------------------------------------------------------------------
    def watch(self, key, prefix=False, start_revision=0):
        req = {"key": _b64(key)}
        if prefix:
            req["range_end"] = _b64(prefix_end(key))
        if start_revision:
            req["start_revision"] = str(start_revision)
        conn, resp = self._post("/v3/watch", {"create_request": req}, stream=True)
        conn.sock.settimeout(None)      # a quiet watch is normal; the caller's health check notices a dead etcd
        return Watch(conn, resp)


# --- a local etcd for tests, benchmarks and demos ---------------------------------------

INSTALL_HINT = "etcd not found: install Debian's etcd-server (apt-get install etcd-server) or put etcd on PATH"


def etcd_binary():
    return shutil.which("etcd") or (os.path.exists("/usr/bin/etcd") and "/usr/bin/etcd") or None


class LocalEtcd:
    """One etcd member on loopback, random ports, a temporary data dir.

        with LocalEtcd() as e:        # or e = LocalEtcd(); e.start() ... e.stop()
            c = Client(e.endpoint)

    stop() kills it and removes the data dir; kill()/start() again keeps
    the data (an outage: the same member comes back with its data)."""

    def __init__(self, data_dir=None):
        self.binary = etcd_binary()
        if self.binary is None:
            raise RuntimeError(INSTALL_HINT)
        self._own_dir = data_dir is None
        self.dir = data_dir or tempfile.mkdtemp(prefix="microtun-etcd-")
        # for the etcd process to listen on: below the ephemeral range, where
        # a port found free stays free until it binds (localnet.free_ports)
        from microtun_host.localnet import free_ports
        self.client_port, self.peer_port = free_ports(2)
        self.endpoint = "http://127.0.0.1:%d" % self.client_port
        self.proc = None
        self._log = None

    def start(self, timeout=15.0):
        peer = "http://127.0.0.1:%d" % self.peer_port
        self._log = open(os.path.join(self.dir, "etcd.log"), "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--name", "m", "--data-dir", os.path.join(self.dir, "data"),
             "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", "m=" + peer, "--log-level", "warn"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        c = Client(self.endpoint, timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                c.range("/")
                return self
            except EtcdError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = ""
                    try:
                        with open(os.path.join(self.dir, "etcd.log"), "rb") as f:
                            tail = f.read()[-400:].decode("utf-8", "replace")
                    except OSError:
                        pass
                    self.kill()
                    raise RuntimeError("etcd did not start on %s: %s" % (self.endpoint, tail.strip()))
                time.sleep(0.05)

    def kill(self):
        """Stop the process (SIGKILL), keep the data."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None
        if self._log:
            self._log.close()
            self._log = None

    def stop(self):
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
