"""A PoP on every core: one supervisor, N worker processes, one UDP port.

    microtun pop --config pop.json --workers 4        (or "workers": 4 in the file)

The supervisor opens N UDP sockets on the listen address, all with
SO_REUSEPORT, and keeps them open for its whole life; worker k is a fresh
interpreter (`python -m microtun_host.workers`) that inherits socket k and
runs the ordinary PoP (pop.Pop) on it. Which worker gets a datagram is not
left to the kernel's 4-tuple hash: a classic BPF program attached to the
group (SO_ATTACH_REUSEPORT_CBPF) reads the outer label from the UDP payload
and returns the worker index, so every packet of one label, whoever sends
it, reaches the same worker. That keeps the PoP's per-label state (learned
return address, path challenges, budgets, counters) in one process without
any sharing on the hot path:

    worker(label) = label % N             by default
    a learn group goes to one worker:     route D with next "learn:L" reads
                                          the address learned on L, so D and
                                          L (and anything chained to them)
                                          share group_worker(group); the
                                          labels whose own label % N differs
                                          are the program's exceptions (one
                                          compare each, MAX_EXCEPTIONS at most)
    a LOOPS segment's ingress route:      its out_label joins its group (the
                                          egress's NACKs and pongs come back
                                          on it, and need the kept packets)
    a gateway: a device's links           one worker per device (link_groups)

Socket indexes in a reuseport group are the order the sockets joined it, and
a socket closing moves the last one into its slot; because the supervisor
never closes its copies, a worker that dies and is restarted gets back the
same socket, the same index and whatever queued for it meanwhile (up to the
socket buffer). A datagram too short to hold a label reaches worker 0, which
counts it as a drop like any PoP would.

The supervisor: restarts a worker that exits (logged, with a backoff when
one keeps dying), re-reads the config on SIGHUP or a control "reload"
(validates it, re-attaches the program, then tells each worker to reload),
answers "stats" on the config's control address with the workers' counters
added up (and each worker's own under "workers"), and stops them all on
SIGTERM/SIGINT. Workers talk to it over private unix sockets in a 0700
directory and die with it (PR_SET_PDEATHSIG).

Per-worker, not per-PoP (docs/DEPLOY.md "Many cores and failover"): the
INIT budget per source address (a device whose labels sit on k workers gets
k times SOURCE_RATE), the challenge budget (CHALLENGE_RATE each) and the
INIT replay filter (a replay arrives on the same label, so the same worker
sees it). A restarted worker starts with empty state, like a restarted PoP.
"""
import argparse
import asyncio
import concurrent.futures
import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

from microtun_host import control, nexthop, pop
from microtun_host import log as logs
from microtun_host.config import ConfigError, format_sockaddr, parse_address

SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)     # Linux >= 4.5
BPF_MAXINSNS = 4096
MAX_EXCEPTIONS = (BPF_MAXINSNS - 4) // 2
POLL_S = 0.1                   # how often the supervisor looks for dead workers
RESTART_MIN_S = 0.1            # restart delay after a worker died; doubles while it keeps dying young ...
RESTART_MAX_S = 10.0           # ... up to this
YOUNG_S = 5.0                  # a worker that dies within this of its start "keeps dying"
STOP_GRACE_S = 5.0             # SIGTERM, then SIGKILL after this
WORKER_QUERY_S = 1.5           # a worker's control reply timeout

# classic BPF opcodes (linux/filter.h)
_LD_W_ABS = 0x20
_ALU_AND_K = 0x54
_ALU_MOD_K = 0x94
_JEQ_K = 0x15
_RET_K = 0x06
_RET_A = 0x16


# --- steering: label -> worker ---------------------------------------------------

def steering(routes, n):
    """{label: worker} for the labels whose worker is not label % n: every
    learn group (a route with next "learn:L" and route L, transitively) on
    the worker of its smallest label. Raises ConfigError when the BPF
    program would not fit."""
    return steering_groups(_learn_groups(routes), n)


def link_groups(links):
    """A gateway's links grouped by device: a session arrives on any of its
    device's links, so they share a worker. The device is the link name's
    part before "/" (what `microtun provision` writes: "sensor-1/a"); a
    link named otherwise is a group of its own."""
    groups = {}
    for link in links:
        groups.setdefault(link.name.split("/", 1)[0] if "/" in link.name else ("", link.in_label),
                          []).append(link.in_label)
    return list(groups.values())


def _learn_groups(routes):
    parent = {}

    def find(x):
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    def union(x, y):
        a, b = find(x), find(y)
        if a != b:
            parent[max(a, b)] = min(a, b)

    labels = []
    for r in routes:
        labels.append(r.in_label)
        if r.learn_from:
            union(r.in_label, r.learn_from)
        if r.seg_out is not None:
            # a LOOPS segment's NACKs and pongs come back on the route's out_label
            # and need the packets its ingress kept: the same worker
            union(r.in_label, r.out_label)
            labels.append(r.out_label)
    groups = {}
    for label in labels:
        g = groups.setdefault(find(label), [])
        if label not in g:
            g.append(label)
    return list(groups.values())


def group_worker(labels, n):
    """The worker of a group of labels: label % n for a lone label (no entry
    needed), else a multiplicative hash of its smallest label: provisioned
    labels come in runs (a path's two labels, a device's links), and
    min % n would put every such group on the same worker."""
    m = min(labels)
    return m % n if len(labels) == 1 else (((m * 0x9E3779B1) & 0xFFFFFFFF) >> 8) % n


def steering_groups(groups, n):
    """{label: worker} putting each group (a list of labels) on one worker
    (group_worker), for the labels where that is not label % n."""
    exceptions = {}
    for labels in groups:
        w = group_worker(labels, n)
        for label in labels:
            if label % n != w:
                exceptions[label] = w
    if len(exceptions) > MAX_EXCEPTIONS:
        raise ConfigError("workers: %d labels need their own steering entry, more than the %d a classic BPF "
                          "program holds; split the table over two processes (two ports) or run workers: 1"
                          % (len(exceptions), MAX_EXCEPTIONS))
    return exceptions


def worker_of(label, n, exceptions):
    """The worker a datagram with this label goes to (what the program computes)."""
    return exceptions.get(label, label % n)


def program(n, exceptions):
    """The classic BPF program as (code, jt, jf, k) tuples."""
    ins = [(_LD_W_ABS, 0, 0, 0),                # A = payload[0:4], big-endian
           (_ALU_AND_K, 0, 0, 0xFFFFFF)]        # A = label
    for label in sorted(exceptions):
        ins.append((_JEQ_K, 0, 1, label))
        ins.append((_RET_K, 0, 0, exceptions[label]))
    ins.append((_ALU_MOD_K, 0, 0, n))
    ins.append((_RET_A, 0, 0, 0))
    return ins


def attach(sock, instructions):
    """SO_ATTACH_REUSEPORT_CBPF on sock (for its whole reuseport group);
    replaces a program already attached. OSError when the kernel refuses."""
    buf = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in instructions))
    fprog = struct.pack("@HP", len(instructions), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def open_group(listen, n):
    """n non-blocking UDP sockets bound to listen with SO_REUSEPORT, in index order."""
    fam = socket.AF_INET6 if listen.family == 6 else socket.AF_INET
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    s.setsockopt(socket.SOL_SOCKET, opt, pop.SOCKET_BUFFER)
                except OSError:
                    pass
            s.bind(listen.sockaddr)
            s.setblocking(False)
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


# --- adding up the workers' stats ------------------------------------------------

_SUMMED = ("rx", "forwarded", "probes", "keepalives", "path_responses", "challenges", "moves",
           "dropped", "sources_tracked", "reloads", "reload_failures")


def aggregate(replies, worker_of_label=None):
    """One PoP's stats from its workers' (a list of stats dicts in worker
    order, None for a worker that did not answer). Every worker holds every
    LOOPS segment, but only the one its label reaches (worker_of_label)
    carries its traffic: each segment's stats are taken from that one."""
    live = [r for r in replies if r is not None]
    out = {k: sum(r.get(k, 0) for r in live) for k in _SUMMED}
    drops = {}
    labels = {}
    learned = {}
    for r in live:
        for k, v in r.get("drops", {}).items():
            drops[k] = drops.get(k, 0) + v
        for lab, e in r.get("labels", {}).items():
            t = labels.setdefault(lab, {"packets": 0, "bytes": 0})
            t["packets"] += e.get("packets", 0)
            t["bytes"] += e.get("bytes", 0)
            for k, v in e.get("drops", {}).items():
                d = t.setdefault("drops", {})
                d[k] = d.get(k, 0) + v
        learned.update(r.get("learned", {}))
    segments = {}
    if worker_of_label is not None:
        for key in sorted({k for r in live for k in r.get("segments", {})}):
            r = replies[worker_of_label(int(key.split(":", 1)[1]))]
            if r is not None and key in r.get("segments", {}):
                segments[key] = r["segments"][key]
    out.update(drops=drops, labels=labels, learned=learned, segments=segments,
               routes=max((r.get("routes", 0) for r in live), default=0),
               draining=max((r.get("draining", 0) for r in live), default=0))
    return out


# --- the supervisor ----------------------------------------------------------------

class Worker:
    __slots__ = ("index", "sock", "control", "proc", "started", "restarts", "delay", "due", "last_exit")

    def __init__(self, index, sock, control_path):
        self.index = index
        self.sock = sock
        self.control = control_path
        self.proc = None
        self.started = 0.0
        self.restarts = 0
        self.delay = RESTART_MIN_S
        self.due = 0.0                  # monotonic time of the next start while proc is None
        self.last_exit = None           # text


def _exit_text(code):
    if code < 0:
        try:
            return "killed by %s" % signal.Signals(-code).name
        except ValueError:
            return "killed by signal %d" % -code
    return "exited with status %d" % code


class Supervisor:
    """The PoP's supervisor; gateway_workers.GatewaySupervisor overrides the
    hooks (_load, _steer, _labels, _specs, _commands, role, worker_module)
    for the gateway (a module of its own: nothing the PoP imports may reach
    the gateway's decrypting code)."""
    role = "pop"
    worker_module = "microtun_host.workers"     # what `python -m` runs for a worker

    def _load(self, path):
        return pop.load_config(path)

    def _steer(self, cfg):
        return steering(cfg.routes, self.n)

    def _labels(self, cfg):
        return [r.in_label for r in cfg.routes]

    def _specs(self, cfg):
        return cfg.routes           # for the next-hop monitor

    def _commands(self):
        return {"stats": self._cmd_stats, "reload": self._cmd_reload}

    def __init__(self, cfg, log):
        self.cfg = cfg
        self.log = log
        self.n = cfg.workers
        self.exceptions = self._steer(cfg)
        self.socks = []
        self.workers = []
        self.dir = None
        self.started = time.monotonic()
        self.reloads = 0
        self.reload_failures = 0
        self._stop = None
        self._poll = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(self.n, 16))
        self._drain_timer = None
        self.monitor = None             # nexthop.Monitor: routes with a standby, probed here for every worker
        self._push = set()              # workers still to be told the monitor's choices

    # -- workers ------------------------------------------------------------------
    def _spawn(self, w):
        fd = w.sock.fileno()
        argv = [sys.executable, "-m", self.worker_module, "--config", self.cfg.path,
                "--index", str(w.index), "--fd", str(fd), "--control", w.control, "--parent", str(os.getpid()),
                "--next-hops", json.dumps(self._choices())]
        self._push.discard(w.index)
        w.proc = subprocess.Popen(argv, pass_fds=(fd,), stdin=subprocess.DEVNULL)
        w.started = time.monotonic()

    def _choices(self):
        return {} if self.monitor is None else {format_sockaddr(k): format_sockaddr(v)
                                                for k, v in self.monitor.choices().items()}

    def _switched(self, primary, dest):
        self._push = {w.index for w in self.workers}
        self._push_choices()

    def _push_choices(self):
        """Tell the workers in self._push which next hops are in use (a
        worker that does not answer now is asked again on the next poll)."""
        if not self._push:
            return
        req = {"cmd": "next_hops", "use": self._choices()}

        def one(w):
            try:
                return w.index, control.query(w.control, req, timeout=0.3).get("ok")
            except control.ControlError:
                return w.index, False
        todo = [w for w in self.workers if w.index in self._push and w.proc is not None]
        for index, ok in self._pool.map(one, todo):
            if ok:
                self._push.discard(index)

    def _watch_next_hops(self, loop, specs):
        if self.monitor is not None:
            self.monitor.update(specs)
        elif any(s.standby is not None for s in specs):
            self.monitor = nexthop.Monitor(self.cfg.listen, specs, self.log, self._switched)
            self.monitor.start(loop)

    def _check(self):
        if self._stop.done():
            return
        self._push_choices()
        now = time.monotonic()
        for w in self.workers:
            if w.proc is not None:
                code = w.proc.poll()
                if code is None:
                    continue
                pid = w.proc.pid
                young = now - w.started < YOUNG_S
                w.delay = min(RESTART_MAX_S, w.delay * 2) if young else RESTART_MIN_S
                w.last_exit = _exit_text(code)
                w.proc = None
                w.due = now + w.delay
                self.log.warning("worker %d (pid %d) %s after %.1f s; restarting it in %.1f s (restart %d)%s",
                                 w.index, pid, w.last_exit,
                                 now - w.started, w.delay, w.restarts + 1,
                                 "; it keeps dying young, see its log lines above" if young and w.restarts else "")
            elif now >= w.due:
                w.restarts += 1
                try:
                    self._spawn(w)
                except OSError as e:
                    w.due = now + RESTART_MAX_S
                    self.log.error("worker %d: cannot start: %s; retrying in %.0f s", w.index, e, RESTART_MAX_S)
                    continue
                self.log.info("worker %d restarted (pid %d)", w.index, w.proc.pid)
        self._poll = asyncio.get_running_loop().call_later(POLL_S, self._check)

    async def run(self):
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        cfg = self.cfg
        try:
            self.socks = open_group(cfg.listen, self.n)
        except OSError as e:
            self.log.error("cannot listen on %s: %s", cfg.listen, e.strerror or e)
            return 1
        try:
            attach(self.socks[0], program(self.n, self.exceptions))
        except OSError as e:
            for s in self.socks:
                s.close()
            self.log.error("cannot steer by label (SO_ATTACH_REUSEPORT_CBPF: %s); this needs Linux >= 4.5; "
                           "run with workers: 1", e.strerror or e)
            return 1
        self.dir = tempfile.mkdtemp(prefix="microtun-pop-")      # 0700: the workers' control sockets
        self.workers = [Worker(k, s, os.path.join(self.dir, "w%d.sock" % k)) for k, s in enumerate(self.socks)]
        ctl = mserver = None
        try:
            if cfg.control is not None:
                try:
                    ctl = await control.serve(cfg.control, self._commands(), self.log)
                except OSError as e:
                    self.log.error("cannot open the control channel on %s: %s", cfg.control, e.strerror or e)
                    return 1
            if getattr(cfg, "metrics", None) is not None:
                from microtun_host import metrics      # prometheus_client: loaded only when asked for
                try:
                    mserver = await metrics.serve(cfg.metrics, self._collector(metrics), self.log)
                except OSError as e:
                    self.log.error("cannot serve metrics on %s: %s", cfg.metrics, e.strerror or e)
                    return 1
            for w in self.workers:
                self._spawn(w)
            self._watch_next_hops(loop, self._specs(cfg))
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop, sig.name)
            loop.add_signal_handler(signal.SIGHUP, self.reload, "SIGHUP")
            self.log.info("listening on %s with %d %s, %d workers (pids %s), %d steering exceptions%s",
                          cfg.listen, len(self._labels(cfg)), "routes" if self.role == "pop" else "links", self.n, " ".join(str(w.proc.pid) for w in self.workers),
                          len(self.exceptions), ", control on %s" % cfg.control if ctl else "")
            self._poll = loop.call_later(POLL_S, self._check)
            await self._stop
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self._poll is not None:
                self._poll.cancel()
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            if self.monitor is not None:
                self.monitor.close()
            if ctl:
                ctl.close()
            if mserver:
                mserver.close()
            self._stop_workers()
            for s in self.socks:
                s.close()
            self._pool.shutdown(wait=False)
            shutil.rmtree(self.dir, ignore_errors=True)
        self.log.info("stopped %d workers; up %.0f s, %d reloads (%d failed)", self.n,
                      time.monotonic() - self.started, self.reloads, self.reload_failures)
        return 0

    def _stop_workers(self):
        procs = [w.proc for w in self.workers if w.proc is not None]
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except OSError:
                pass
        end = time.monotonic() + STOP_GRACE_S
        for p in procs:
            try:
                p.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.warning("worker pid %d did not stop within %.0f s: killed", p.pid, STOP_GRACE_S)
                p.kill()
                p.wait()

    def stop(self, why="stop"):
        if self._stop is not None and not self._stop.done():
            self.log.info("%s: shutting down %d workers", why, self.n)
            self._stop.set_result(None)

    # -- talking to workers ----------------------------------------------------------
    def _ask_all(self, request):
        """[(worker, reply dict or None, error text or None)] from every worker, in parallel."""
        def one(w):
            if w.proc is None:
                return w, None, "not running (%s; restart pending)" % (w.last_exit or "starting")
            try:
                return w, control.query(w.control, request, timeout=WORKER_QUERY_S), None
            except control.ControlError as e:
                return w, None, str(e)
        return list(self._pool.map(one, self.workers))

    def _collector(self, metrics):
        # the metrics of all the workers together (each worker's "metrics" is off)
        return metrics.PopCollector(lambda: self._cmd_stats(None))

    def _cmd_stats(self, req):
        answers = self._ask_all({"cmd": "stats"})
        out = aggregate([r if r and r.get("ok") else None for _, r, _ in answers],
                        worker_of_label=lambda label: worker_of(label, self.n, self.exceptions))
        per = []
        for w, r, err in answers:
            e = {"index": w.index, "pid": w.proc.pid if w.proc else None, "restarts": w.restarts,
                 "alive": w.proc is not None, "last_exit": w.last_exit}
            if r and r.get("ok"):
                e.update(rx=r.get("rx"), forwarded=r.get("forwarded"), dropped=r.get("dropped"),
                         uptime_s=r.get("uptime_s"), learned=len(r.get("learned", {})),
                         socket_io=r.get("socket_io"))
            else:
                e["error"] = err or (r or {}).get("error")
            per.append(e)
        out.update(name=self.cfg.name, uptime_s=round(time.monotonic() - self.started, 3),
                   reloads=self.reloads, reload_failures=self.reload_failures,
                   worker_count=self.n, workers_answering=sum(1 for e in per if "error" not in e),
                   steering_exceptions=len(self.exceptions), workers=per)
        if self.monitor is not None:
            out["next_hop_monitor"] = self.monitor.stats()
            if self._push:
                out["next_hops_pending"] = sorted(self._push)       # workers not told yet
            elif self._choices():
                out["standby_in_use"] = self._choices()              # every worker uses them
        return out

    def _cmd_reload(self, req):
        return self.reload("control reload")

    def reload(self, why="reload"):
        """Re-read the config; on any problem keep everything as it runs.
        The program is re-attached first (a label of a new learn group then
        reaches its worker, which loads the route a moment later), then each
        worker reloads the same file. Labels removed keep their old steering
        while the workers drain them (pop.DRAIN_S)."""
        old = self.cfg
        try:
            cfg = self._load(old.path)
            exceptions = self._steer(cfg)
        except ConfigError as e:
            self.reload_failures += 1
            self.log.error("%s: config not reloaded, keeping %d labels: %s", why, len(self._labels(old)), e)
            return {"ok": False, "error": str(e)}
        for field in ("listen", "control", "name", "file_workers"):
            if getattr(cfg, field) != getattr(old, field):
                self.log.warning("%s: %s changed to %s; it takes effect on restart only", why,
                                 field.replace("file_", ""), getattr(cfg, field))
        cfg.listen, cfg.control, cfg.name, cfg.workers = old.listen, old.control, old.name, old.workers
        if cfg.log_level != old.log_level:
            logs.set_level(self.log, cfg.log_level)
        new_labels = set(self._labels(cfg))
        keep = {lab: worker_of(lab, self.n, self.exceptions) for lab in self._labels(old) if lab not in new_labels}
        draining = dict(exceptions)
        draining.update({k: v for k, v in keep.items() if v != k % self.n})
        try:
            attach(self.socks[0], program(self.n, draining))
        except OSError as e:
            self.reload_failures += 1
            self.log.error("%s: config not reloaded: the steering program was refused: %s", why, e.strerror or e)
            return {"ok": False, "error": "steering program refused: %s" % (e.strerror or e)}
        self.exceptions = exceptions
        if len(draining) != len(exceptions):
            loop = asyncio.get_running_loop()
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            self._drain_timer = loop.call_later(pop.DRAIN_S + 1.0, self._drop_drained)
        self.cfg = cfg
        answers = self._ask_all({"cmd": "reload"})
        self._watch_next_hops(asyncio.get_running_loop(), self._specs(cfg))
        self._push = {w.index for w in self.workers}
        self._push_choices()
        bad = ["worker %d: %s" % (w.index, err or (r or {}).get("error")) for w, r, err in answers
               if not (r and r.get("ok"))]
        if bad:
            self.reload_failures += 1
            self.log.error("%s: reloaded %s, but not in every worker: %s", why, cfg.path, "; ".join(bad))
            return {"ok": False, "error": "; ".join(bad)}
        self.reloads += 1
        first = dict(answers[0][1])
        first.pop("id", None)
        self.log.info("%s: reloaded %s in %d workers: %d %s%s", why, cfg.path, self.n, len(self._labels(cfg)),
                      "routes" if self.role == "pop" else "links",
                      " (%d added, %d removed, %d changed)" % (first.get("added", 0), first.get("removed", 0),
                                                             first.get("changed", 0)) if self.role == "pop" else "")
        first.update(ok=True, workers=self.n)
        return first

    def _drop_drained(self):
        self._drain_timer = None
        try:
            attach(self.socks[0], program(self.n, self.exceptions))
        except OSError as e:
            self.log.error("steering: cannot drop the drained labels' entries: %s", e.strerror or e)


def pop_main(cfg, check=False):
    """`microtun pop` with cfg.workers > 1: the supervisor."""
    try:
        exceptions = steering(cfg.routes, cfg.workers)
    except ConfigError as e:
        print("microtun pop: %s: %s" % (cfg.path, e), file=sys.stderr)
        return 2
    if check:
        print("%s: ok: PoP %s, %d routes, %d workers (%d steering exceptions)" % (
            cfg.path, cfg.name, len(cfg.routes), cfg.workers, len(exceptions)))
        return 0
    log = logs.setup(cfg.name, cfg.log_level)
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(Supervisor(cfg, log).run())
    finally:
        loop.close()


def format_pop_status(s):
    """Readable lines for a PoP's stats (one process or a supervisor's sums)."""
    lines = ["PoP %s: up %.0f s, %d routes, %d learned, %d reloads (%d failed)%s" % (
        s.get("name"), s.get("uptime_s", 0), s.get("routes", 0), len(s.get("learned", {})), s.get("reloads", 0),
        s.get("reload_failures", 0), ", %d workers" % s["worker_count"] if "worker_count" in s else "")]
    drops = ", ".join("%s %d" % (k, v) for k, v in sorted(s.get("drops", {}).items()) if v)
    lines.append("  rx %d, forwarded %d, probes %d, keepalives %d, dropped %d%s" % (
        s.get("rx", 0), s.get("forwarded", 0), s.get("probes", 0), s.get("keepalives", 0), s.get("dropped", 0),
        " (%s)" % drops if drops else ""))
    for w in s.get("workers", ()):
        if "error" in w:
            lines.append("  worker %d: pid %s, restarts %d: NOT ANSWERING: %s" % (
                w["index"], w.get("pid"), w.get("restarts", 0), w["error"]))
        else:
            lines.append("  worker %d: pid %d, up %.0f s, restarts %d%s: rx %d, forwarded %d, dropped %d, %d learned"
                         % (w["index"], w["pid"], w.get("uptime_s") or 0, w["restarts"],
                            " (last: %s)" % w["last_exit"] if w.get("last_exit") else "", w.get("rx") or 0,
                            w.get("forwarded") or 0, w.get("dropped") or 0, w.get("learned", 0)))
    return "\n".join(lines)


def pop_status_main(config_path, as_json=False):
    """`microtun status --config pop.json`: ask the PoP (or its supervisor) for stats."""
    import json
    try:
        cfg = pop.load_config(config_path)
    except ConfigError as e:
        print("microtun status: %s" % e, file=sys.stderr)
        return 2
    if cfg.control is None:
        print("microtun status: %s: control: not set; add \"control\": \"pop.sock\" and restart the PoP"
              % config_path, file=sys.stderr)
        return 2
    try:
        reply = control.query(str(cfg.control), {"cmd": "stats"}, timeout=5.0)
    except control.ControlError as e:
        print("microtun status: %s (is the PoP running?)" % e, file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print("microtun status: %s" % reply.get("error"), file=sys.stderr)
        return 1
    reply.pop("ok", None)
    reply.pop("id", None)
    print(json.dumps(reply, indent=1) if as_json else format_pop_status(reply))
    return 0


# --- a worker process ----------------------------------------------------------------

def _die_with_parent(parent):
    """SIGTERM this process when the supervisor dies (Linux prctl), and exit
    now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        sys.exit(1)


def worker_main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m microtun_host.workers",
                                 description="one PoP worker (started by `microtun pop --workers N`)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--next-hops", default="{}", help="JSON {primary: in use}, from the supervisor's probes")
    a = ap.parse_args(argv)
    _die_with_parent(a.parent)
    try:
        cfg = pop.load_config(a.config)
    except ConfigError as e:
        print("microtun pop worker %d: %s" % (a.index, e), file=sys.stderr)
        return 2
    cfg.metrics = None      # the supervisor serves the metrics, from all the workers' stats
    log = logs.setup("%s/w%d" % (cfg.name, a.index), cfg.log_level)
    use = {parse_address(k).sockaddr: parse_address(v).sockaddr for k, v in json.loads(a.next_hops).items()}
    sock = socket.socket(fileno=a.fd)
    sock.setblocking(False)
    loop = pop._new_loop()
    try:
        return loop.run_until_complete(
            pop.Pop(cfg, log, sock=sock, control_addr=control.SocketPath(a.control), worker=a.index,
                    next_hops=use).run())
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(worker_main())
