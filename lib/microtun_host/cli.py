"""`microtun` command line: one subcommand per host role.

    microtun pop --config pop.json [--workers N] [--check]
    microtun gateway --config gateway.json [--workers N] [--check]
    microtun status --config gateway.json | --control HOST:PORT [--json]
    microtun provision topology.toml --out DIR [--fleet fleet.json] [--operator-key KEY]
    microtun fleet keygen|revoke|expire|status ...     (docs/FLEET.md)
    microtun log --fleet fleet.json | --file DIR/changelog.jsonl --trust KEY [--device NAME]
    microtun echo 127.0.0.1:5000
    microtun logs --port /dev/ttyACM0 [--follow]
    microtun ops DEVICE --config gateway.json --operator-key KEY exec|ls|get|put|logs|health|reboot|token|mpremote
    microtun release build|show ...                   (docs/UPDATE.md)

Adding a subcommand is one small function that declares its arguments and
a run function, plus one entry in SUBCOMMANDS:

    def _gateway(sub):
        p = sub.add_parser("gateway", help="run the gateway")
        p.add_argument("--config", required=True, metavar="FILE")
        p.set_defaults(run=lambda args: _lazy("gateway").main(args.config))

Each run function returns the exit status: 0 ok, 1 runtime failure, 2 bad
usage or bad config (one line on stderr, no traceback). An exception that
escapes one anyway (a port taken, a missing file...) is printed as one line
too; MICROTUN_TRACEBACK=1 shows the traceback. Role modules are imported
only when their subcommand runs.
"""
import argparse
import importlib
import os
import sys


def _lazy(module):
    return importlib.import_module("microtun_host." + module)


def _workers(text):
    if not text.isdigit() or not 1 <= int(text) <= 256:
        raise argparse.ArgumentTypeError("expected a number of worker processes in 1..256, got %r" % text)
    return int(text)


def _pop(sub):
    p = sub.add_parser("pop", help="run a PoP: label-switching relay on the outer plane",
                       description="Run a PoP. SIGHUP reloads the config; SIGTERM/SIGINT stop it.")
    p.add_argument("--config", required=True, metavar="FILE", help="PoP config (JSON, see docs/OUTER.md)")
    p.add_argument("--check", action="store_true", help="only validate the config and exit (0 ok, 2 invalid)")
    p.add_argument("--workers", type=_workers, metavar="N",
                   help="worker processes sharing the port, steered by label (default: the config's "
                        "\"workers\", else 1; see docs/DEPLOY.md)")
    p.set_defaults(run=lambda args: _node("pop", args))


def _gateway(sub):
    p = sub.add_parser("gateway", help="run the gateway: inner tunnel responder for many devices",
                       description="Run the gateway. SIGHUP reloads config and registry; SIGTERM/SIGINT stop it.")
    p.add_argument("--config", required=True, metavar="FILE", help="gateway config (JSON, see docs/CONFIG.md)")
    p.add_argument("--check", action="store_true", help="only validate the config and registry, then exit")
    p.add_argument("--workers", type=_workers, metavar="N",
                   help="gateway processes sharing the port, each device on one (default: the config's "
                        "\"workers\", else 1; see docs/DEPLOY.md)")
    p.set_defaults(run=lambda args: _node("gateway", args))


def _node(kind, args):
    """A PoP or gateway: fleet mode when its config has a "fleet" section
    (docs/FLEET.md), else the file-mode server, with its workers."""
    fleet = _lazy("fleet")
    if fleet.wants_fleet(args.config):
        if args.workers is not None and args.workers > 1:
            print("microtun %s: --workers is not supported in fleet mode yet (%s): run one process per host "
                  "or drop --workers" % (kind, args.config), file=sys.stderr)
            return 2
        node = _lazy("fleetnode")
        return (node.run_pop if kind == "pop" else node.run_gateway)(args.config, check=args.check)
    return _lazy(kind).main(args.config, check=args.check, workers=args.workers)


def _status(sub):
    p = sub.add_parser("status", help="show each device's session, paths, RTTs, bytes and drops",
                       description="Ask a running gateway for its status over its control channel.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", metavar="FILE", help="the gateway's config (its control address is read from it)")
    g.add_argument("--control", metavar="HOST:PORT", help="the gateway's control address")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.set_defaults(run=lambda args: _lazy("gateway").status_main(args.config, args.control, args.json))


def _provision(sub):
    p = sub.add_parser("provision", help="generate every key and config from a topology file",
                       description="Write keys, PoP tables, gateway, registry and device configs into DIR. "
                                   "Re-running reuses the keys and labels in DIR/state.json.")
    p.add_argument("topology", metavar="TOPOLOGY", help="topology file (TOML, see docs/PROVISIONING.md)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (files mode 0600)")
    p.add_argument("--fleet", metavar="FILE", help="also publish to etcd as signed log records (fleet.json; "
                   "docs/FLEET.md); writes DIR/fleet/ node configs")
    p.add_argument("--operator-key", metavar="FILE", help="sign the change log with this key (with --fleet: in "
                   "etcd; without: appended to DIR/changelog.jsonl)")
    p.set_defaults(run=lambda args: _lazy("provision").main(args.topology, args.out, args.fleet, args.operator_key))


def _flash(sub):
    p = sub.add_parser("flash", help="put the firmware and a device's config on a board (mpremote)",
                       description="Compile the firmware with mpy-cross, copy it and DIR/devices/NAME.json to the "
                                   "board with mpremote, verify sha256 on the board, reset. See docs/FIRMWARE.md.")
    p.add_argument("--port", required=True, metavar="PORT",
                   help="the board's serial port: /dev/ttyACM0, /dev/ttyUSB0, COM3, or a vboard's /dev/pts/N")
    p.add_argument("--device", required=True, metavar="NAME", help="flash CONFIG_DIR/devices/NAME.json")
    p.add_argument("--config-dir", default="deploy", metavar="DIR",
                   help="what `microtun provision --out DIR` wrote (default: deploy)")
    p.add_argument("--board", metavar="BOARD", help="a board in boards/ (default: ask the board what it is)")
    p.add_argument("--app", metavar="FILE", help="your application instead of firmware/app.py")
    p.add_argument("--no-reset", action="store_true", help="leave the board at the REPL afterwards")
    p.add_argument("--frozen", action="store_true", help="microtun is frozen into the board's firmware: copy no .mpy")
    p.add_argument("--safe-first", action="store_true", default=None,
                   help="SAFE file + reset before copying (automatic when the config turns the watchdog on)")
    p.add_argument("--lines", action="store_true",
                   help="keep line numbers in tracebacks (mpy-cross without -O3: ~1.7K more heap on the board; "
                        "docs/FIRMWARE.md)")
    p.set_defaults(run=lambda args: _lazy("flash").run(args))


def _echo(sub):
    p = sub.add_parser("echo", help="a UDP echo service for a gateway channel (to try the tunnel)",
                       description="Send every UDP datagram back to its sender: the service a gateway "
                                   "channel's \"services\" entry points at in the README's walk-through.")
    p.add_argument("address", metavar="HOST:PORT", help="where to listen, e.g. 127.0.0.1:5000")
    p.add_argument("--show", type=int, default=20, metavar="N", help="print the first N datagrams (default 20)")
    p.set_defaults(run=lambda args: _lazy("echo").main(args.address, args.show))


def _logs(sub):
    p = sub.add_parser("logs", help="print a board's log without stopping its tunnel",
                       description="Ask the firmware running on the board for its log files over the serial "
                                   "console (no Ctrl-C, no raw REPL: the tunnel keeps running). See "
                                   "docs/FIRMWARE.md, \"The log\".")
    p.add_argument("--port", required=True, metavar="PORT", help="the board's serial port (or a vboard's /dev/pts/N)")
    p.add_argument("--follow", "-f", action="store_true", help="then keep printing the console until Ctrl-C")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="wait this long for an answer (default 5)")
    p.set_defaults(run=lambda args: _lazy("boardlog").main(args.port, args.follow, args.timeout))


def _fleet(sub):
    _lazy("fleet").add_parser(sub)


def _log(sub):
    _lazy("fleet").add_log_parser(sub)


def _ops(sub):
    _lazy("ops").add_parser(sub)


def _release(sub):
    # its arguments are parsed by microtun_host.release itself: building the
    # parser must not import it (every pop and gateway process builds this one)
    p = sub.add_parser("release", help="build, sign and check code releases for updates over the air (docs/UPDATE.md)",
                       description="microtun release build|show ... (`microtun release build -h`)")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="build|show ...")
    p.set_defaults(run=lambda args: _lazy("release").main(args.args))


SUBCOMMANDS = [_pop, _gateway, _status, _provision, _flash, _echo, _logs, _fleet, _log, _ops, _release]


def build_parser():
    parser = argparse.ArgumentParser(prog="microtun", description="microtun host tools")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        # Every expected mistake is reported by the subcommand itself; this is
        # the net under it: one line, the traceback only on request.
        if os.environ.get("MICROTUN_TRACEBACK"):
            raise
        what = str(e).strip().splitlines()
        print("microtun %s: %s%s (MICROTUN_TRACEBACK=1 shows where)" % (
            args.command, type(e).__name__ + ": " if not isinstance(e, OSError) else "",
            what[0] if what else type(e).__name__), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
