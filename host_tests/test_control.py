"""The control channel (issue 11, item 13): an owner-only unix socket. Another
uid cannot connect (socket 0600 in a 0700 directory); one that gets a
connection anyway (the permissions loosened by hand) is refused by its peer
uid, counted and logged. Plus: stale and live sockets, unsafe directories,
long paths, the older UDP form's warning, and one-line errors."""
import asyncio
import io
import json
import logging
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from microtun_host import control

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534

class Served:
    """control.serve() on its own event loop in a thread."""

    def __init__(self, where, commands=None):
        self.stream = io.StringIO()
        self.log = logging.getLogger("microtun.test-control-%d" % id(self))
        self.log.propagate = False
        self.log.addHandler(logging.StreamHandler(self.stream))
        self.log.setLevel(logging.INFO)
        self.calls = []
        self.loop = asyncio.new_event_loop()
        cmds = commands or {"stats": self._stats}
        ready = threading.Event()
        self.error = None

        def run():
            asyncio.set_event_loop(self.loop)
            try:
                self.server = self.loop.run_until_complete(control.serve(where, cmds, self.log))
            except Exception as e:
                self.error = e
                ready.set()
                return
            ready.set()
            self.loop.run_forever()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(5)
        if self.error is not None:
            self.thread.join(2)
            raise self.error

    def _stats(self, req):
        self.calls.append(req)
        return {"counters": {"x": 1}}

    def close(self):
        if self.loop.is_closed():
            return
        async def stop():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def served():
    made = []

    def start(*a, **kw):
        s = Served(*a, **kw)
        made.append(s)
        return s
    yield start
    for s in made:
        s.close()


def as_other_user(path):
    """Connect as uid/gid 65534 (a forked child that drops root) and send
    one request: the reply line, "closed", or "OSError <errno>"."""
    import socket
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:                               # the child: no pytest, no exceptions out of here
        out = "child failed"
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(3)
            try:
                s.connect(str(path))
                s.sendall(b'{"cmd": "stats", "id": 1}\n')
                out = s.recv(65536).decode().strip() or "closed"
            except OSError as e:
                out = "OSError %d" % e.errno
        finally:
            os.write(wr, out.encode())
            os._exit(0)
    os.close(wr)
    data = b""
    while True:
        chunk = os.read(rd, 65536)
        if not chunk:
            break
        data += chunk
    os.close(rd)
    os.waitpid(pid, 0)
    return data.decode()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")


@pytest.fixture
def reachable():
    """A directory every user can reach (pytest's tmp_path is 0700 all the
    way up): what stops the other uid must be ours, not pytest's."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="microtun-test-control-")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_socket_is_owner_only_and_works_for_the_owner(tmp_path, served):
    sock = tmp_path / "run" / "gw.sock"
    s = served(str(sock))
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700        # made by serve()
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    reply = control.query(str(sock), {"cmd": "stats"})
    assert reply["ok"] and reply["counters"] == {"x": 1}
    assert control.query(str(sock), {"cmd": "stat"})["error"].startswith("unknown command 'stat'")
    assert len(s.calls) == 1
    s.close()
    assert not sock.exists(), "close() removes the socket"


@needs_root
def test_another_uid_cannot_connect(reachable, served):
    sock = reachable / "run" / "gw.sock"
    s = served(str(sock))
    out = as_other_user(sock)
    assert out == "OSError 13", out           # EACCES: the 0700 directory, the 0600 socket
    assert s.calls == [] and s.server.refused == 0


@needs_root
def test_another_uid_is_refused_even_when_permissions_are_loosened(reachable, served):
    sock = reachable / "run" / "gw.sock"
    s = served(str(sock))
    os.chmod(sock.parent, 0o755)
    os.chmod(sock, 0o666)                      # a careless chmod: the peer-uid check still holds
    for n in (1, 2):
        reply = json.loads(as_other_user(sock))
        assert reply["ok"] is False and "uid %d may not use this control socket" % NOBODY in reply["error"]
        assert s.server.refused == n
    assert s.calls == [], "a refused connection ran a command"
    assert "refused a connection from uid %d" % NOBODY in s.stream.getvalue()
    assert control.query(str(sock), {"cmd": "stats"})["ok"]     # the owner still can


def test_stale_socket_is_replaced_and_a_live_one_is_not_taken_over(tmp_path, served):
    import socket
    sock = tmp_path / "gw.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()                              # a process that died: the file stays
    s = served(str(sock))
    assert control.query(str(sock), {"cmd": "ping"})["ok"]
    with pytest.raises(control.ControlError, match="another process is serving it"):
        served(str(sock))
    assert control.query(str(sock), {"cmd": "ping"})["ok"], "the second server broke the first"
    s.close()
    (tmp_path / "file.sock").write_text("x")
    with pytest.raises(control.ControlError, match="not a socket is in the way"):
        served(str(tmp_path / "file.sock"))


def test_directory_others_can_write_is_refused(tmp_path, served):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(control.ControlError, match=r"writable by other users \(mode 777.*chmod 700"):
        served(str(d / "gw.sock"))


def test_long_socket_path(tmp_path, served):
    d = tmp_path / ("x" * 60) / ("y" * 60)
    sock = d / "gateway-with-a-long-name.sock"
    assert len(str(sock)) > 108
    served(str(sock))
    assert control.query(str(sock), {"cmd": "ping"})["ok"]
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600


def test_udp_form_still_works_with_a_warning(served):
    from microtun_host.localnet import free_ports
    addr = "127.0.0.1:%d" % free_ports(1)[0]
    s = served(addr)
    assert control.query(addr, {"cmd": "stats"})["ok"]
    assert "any local user can read stats" in s.stream.getvalue()


def test_config_field_forms(tmp_path):
    from microtun_host.config import ConfigError, Node
    f = str(tmp_path / "gw.json")
    v = control.from_config(Node(f, "", {"control": "gw.sock"}))
    assert isinstance(v, control.SocketPath) and v == str(tmp_path / "gw.sock")
    assert control.from_config(Node(f, "", {"control": "/run/x/gw.sock"})) == "/run/x/gw.sock"
    assert control.from_config(Node(f, "", {})) is None
    assert str(control.from_config(Node(f, "", {"control": "127.0.0.1:7390"}))) == "127.0.0.1:7390"
    for bad, msg in [("localhost:7390", "socket path"), ("10.0.0.1:7390", "loopback")]:
        with pytest.raises(ConfigError, match=msg):
            control.from_config(Node(f, "", {"control": bad}))


@pytest.mark.parametrize("argv, line", [
    (["status", "--control", "localhost:7390"], "expected a socket path"),
    (["status", "--control", "{tmp}/none.sock"], "no such socket; is the process running?"),
])
def test_cli_errors_are_one_line(tmp_path, argv, line):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    r = subprocess.run([sys.executable, "-m", "microtun_host.cli"] + argv, capture_output=True, text=True,
                       timeout=30, env=dict(os.environ, PYTHONPATH=str(ROOT / "lib")))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert line in r.stderr
    r = subprocess.run([sys.executable, "-m", "microtun_host.control", argv[-1], "ping"], capture_output=True,
                       text=True, timeout=30, env=dict(os.environ, PYTHONPATH=str(ROOT / "lib")))
    assert r.returncode == 1 and "Traceback" not in r.stderr and line in r.stderr
