"""The gateway on every core: microtun_host.workers' supervisor running N
gateway processes on one port (`microtun gateway --workers N`, or
"workers": N in gateway.json), each device's links steered to one of them
(workers.link_groups), so its sessions, service sockets and budgets live
in that one process. docs/DEPLOY.md, "Many cores and failover".

A module of its own: the PoP imports microtun_host.workers, and nothing a
PoP imports may reach code able to decrypt the inner layer
(host_tests/test_pop.py checks the import closure).
"""
import argparse
import asyncio
import logging
import socket
import sys
import time

from microtun_host import control
from microtun_host import log as logs
from microtun_host.config import ConfigError
from microtun_host.workers import Supervisor, _die_with_parent, link_groups, steering_groups, worker_of

RELAY_IDLE_S = 300.0        # a worker's ops reply (or its next streamed line) may take this long


# --- the gateway's supervisor ---------------------------------------------------------

def merge_status(replies):
    """One gateway status from its workers' (status dicts, None for one that
    did not answer). Every worker knows every registered device; a device's
    entry comes from the worker that has its session (its links are steered
    there), else from any."""
    live = [r for r in replies if r is not None]
    devices = {}
    counters = {}
    for r in live:
        for k, v in r.get("counters", {}).items():
            counters[k] = counters.get(k, 0) + v
        for d in r.get("devices", []):
            old = devices.get(d["name"])
            if old is None or (d.get("established"), d.get("rx_packets", 0)) > (old.get("established"),
                                                                               old.get("rx_packets", 0)):
                devices[d["name"]] = d
    return {"devices": [devices[k] for k in sorted(devices)], "counters": counters,
            "gateway": live[0].get("gateway") if live else None}


class GatewaySupervisor(Supervisor):
    """N gateway processes on one port, a device's links steered to one of
    them (link_groups): its sessions, services and budgets live there."""
    role = "gateway"
    worker_module = "microtun_host.gateway_workers"

    def _load(self, path):
        from microtun_host import gateway
        return gateway.load_gateway_config(path)

    def _steer(self, cfg):
        return steering_groups(link_groups(cfg.links), self.n)

    def _labels(self, cfg):
        return [link.in_label for link in cfg.links]

    def _specs(self, cfg):
        return []

    def _commands(self):
        return {"stats": self._cmd_gw_stats, "status": self._cmd_gw_status, "reload": self._cmd_reload,
                "ops_challenge": self._cmd_ops, "ops_login": self._cmd_ops, "ops": self._cmd_ops}

    def worker_for_device(self, name):
        """The worker holding a device's sessions: the one its links are
        steered to (link_groups: the links named "DEVICE/..."), or None for
        a name no link carries."""
        labels = [link.in_label for link in self.cfg.links
                  if isinstance(name, str) and link.name.split("/", 1)[0] == name and "/" in link.name]
        if not labels:
            return None
        return self.workers[worker_of(min(labels), self.n, self.exceptions)] if self.workers else None

    async def _cmd_ops(self, req):
        """ops_challenge, ops_login, ops (docs/OPS.md): passed on to the
        worker that holds the device's session, whose reply (and streamed
        lines) come back as they are. Challenges and tokens live in that
        worker, so a device's login and its operations meet there."""
        name = req.get("device")
        w = self.worker_for_device(name)
        if w is None:
            return {"ok": False, "error": "unknown device %r: no link of the gateway's config is named "
                                          "\"%s/...\" (the registry's devices: microtun status)" % (name, name)}
        if w.proc is None:
            return {"ok": False, "error": "device %s: its gateway worker %d is not running (%s); it restarts "
                                          "by itself, try again in a few seconds" % (
                                              name, w.index, w.last_exit or "starting")}
        send = control.partial_sender(req)
        try:
            rep = await control.relay(w.control, req, RELAY_IDLE_S, on_partial=send)
        except control.ControlError as e:
            return {"ok": False, "error": "device %s: its gateway worker %d did not answer: %s" % (name, w.index, e)}
        rep.pop("id", None)
        return rep

    def _per_worker(self, answers, key):
        per = []
        for w, r, err in answers:
            e = {"index": w.index, "pid": w.proc.pid if w.proc else None, "restarts": w.restarts,
                 "alive": w.proc is not None, "last_exit": w.last_exit}
            if not (r and r.get("ok")):
                e["error"] = err or (r or {}).get("error")
            elif key == "status":
                e["established"] = sum(1 for d in r["status"].get("devices", []) if d.get("established"))
            per.append(e)
        return per

    def _collector(self, metrics):
        return metrics.GatewayCollector(lambda: self._cmd_gw_status(None)["status"], self.cfg.crypto)

    def _cmd_gw_status(self, req):
        answers = self._ask_all({"cmd": "status"})
        st = merge_status([r["status"] if r and r.get("ok") else None for _, r, _ in answers])
        st.update(gateway=self.cfg.name, uptime_s=round(time.monotonic() - self.started, 1), worker_count=self.n,
                  workers=self._per_worker(answers, "status"), steering_exceptions=len(self.exceptions))
        return {"status": st}

    def _cmd_gw_stats(self, req):
        answers = self._ask_all({"cmd": "stats"})
        counters = {}
        for _, r, _ in answers:
            if r and r.get("ok"):
                for k, v in r.get("counters", {}).items():
                    counters[k] = counters.get(k, 0) + v
        return {"counters": counters, "worker_count": self.n,
                "workers_answering": sum(1 for _, r, _ in answers if r and r.get("ok")),
                "workers": self._per_worker(answers, "stats")}


def gateway_main(cfg, check=False):
    """`microtun gateway` with cfg.workers > 1: the supervisor."""
    try:
        exceptions = steering_groups(link_groups(cfg.links), cfg.workers)
    except ConfigError as e:
        print("microtun gateway: %s: %s" % (cfg.path, e), file=sys.stderr)
        return 2
    if check:
        print("%s: ok (%d links, %d devices, %d workers, %d steering exceptions)" % (
            cfg.path, len(cfg.links), len(cfg.devices), cfg.workers, len(exceptions)))
        return 0
    log = logs.setup(cfg.name, cfg.log_level)
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(GatewaySupervisor(cfg, log).run())
    finally:
        loop.close()


def worker_main(argv=None):
    """One gateway worker (started by GatewaySupervisor)."""
    ap = argparse.ArgumentParser(prog="python -m microtun_host.gateway_workers",
                                 description="one gateway worker (started by `microtun gateway --workers N`)")
    for opt in ("--config", "--control"):
        ap.add_argument(opt, required=True)
    for opt in ("--index", "--fd", "--parent"):
        ap.add_argument(opt, type=int, required=True)
    ap.add_argument("--next-hops", default="{}", help=argparse.SUPPRESS)     # the PoP's; unused here
    a = ap.parse_args(argv)
    _die_with_parent(a.parent)
    return _gateway_worker(a)


def _gateway_worker(a):
    from microtun_host import gateway
    try:
        cfg = gateway.load_gateway_config(a.config)
    except ConfigError as e:
        print("microtun gateway worker %d: %s" % (a.index, e), file=sys.stderr)
        return 2
    lg = logging.getLogger("microtun.gateway")           # the logger gateway.py writes to
    lg.propagate = False
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logs._Formatter(logs._FORMAT, logs._DATEFMT, "%s/w%d" % (cfg.name, a.index)))
    lg.addHandler(h)
    logs.set_level(lg, cfg.log_level)
    cfg.control = control.SocketPath(a.control)
    cfg.metrics = None      # the supervisor serves the metrics, from all the workers' status
    sock = socket.socket(fileno=a.fd)
    sock.setblocking(False)
    return asyncio.run(gateway.serve(cfg, sock=sock))


if __name__ == "__main__":
    sys.exit(worker_main())
