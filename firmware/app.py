"""The sample application: copy it, edit it, flash it (docs/FIRMWARE.md,
"The application"). The firmware (microtun_fw) owns the loop, the network
and the tunnel; it calls this class.

    channel 1  telemetry, a small JSON object every telemetry_s seconds
               {"n": 7, "up": 70, "temp": 24.5, "mem": 31200}
               alarms, {"alarm": "temp", "temp": 51.0, "above": 45}, sent with
               policy "critical": one copy on every live path
    channel 2  commands from the gateway's channel-2 service, one reply each:
               ping -> pong, led on / led off -> ok, health -> JSON, reboot -> ok.
               On every new session the app says {"hello": NAME, "boot": N}
               there first, so the service learns where the device is.

Settings: the "app" object in microtun.json, e.g.
    "app": {"telemetry_s": 10, "health_s": 60, "alarm_above": 45}

The firmware calls:
    App(tunnel, settings, board, log)
    tick(now) -> ms until it wants to be called again   (often; keep it quick)
    on_data(channel, data)                                (a message arrived)
    on_link(up)                                           (session up or down)
"""
import gc
import json
from micropython import const
from time import ticks_ms, ticks_diff, ticks_add

# channels; private consts: compiled into the code, no name or global on
# the board (docs/FIRMWARE.md, "The application")
_TELEMETRY = const(1)
_COMMANDS = const(2)


class App:
    def __init__(self, tunnel, settings, board, log):
        self.t = tunnel
        self.board = board
        self.log = log
        self.every = int(settings.get("telemetry_s", 10) * 1000)
        self.health_every = int(settings.get("health_s", 60) * 1000)
        self.alarm_above = settings.get("alarm_above")     # None: no alarms
        self.alarm_on = False
        self.n = 0
        self.replies = 0
        self.start = ticks_ms()
        self.next_send = self.start
        self.next_health = ticks_add(self.start, self.health_every)
        self.reboot_at = None

    # -- called by the firmware --------------------------------------------------
    def tick(self, now):
        if self.reboot_at is not None and ticks_diff(now, self.reboot_at) >= 0:
            import machine
            machine.reset()
        if ticks_diff(now, self.next_send) >= 0:
            self.next_send = ticks_add(now, self.every)
            if self.t.established:
                self.telemetry(now)
        if ticks_diff(now, self.next_health) >= 0:
            self.next_health = ticks_add(now, self.health_every)
            self.print_health()
        return min(ticks_diff(self.next_send, now), ticks_diff(self.next_health, now))

    def on_link(self, up):
        if up:
            self.t.send(_COMMANDS, json.dumps({"hello": self.t.cfg.name, "boot": self.t.boot_counter}).encode())
            self.next_send = ticks_ms()          # first telemetry right away

    def on_data(self, channel, data):
        if channel == _COMMANDS:
            self.command(bytes(data).decode().strip())
        else:
            self.replies += 1
            if self.replies <= 3:
                print("app: reply on channel %d: %s" % (channel, bytes(data)[:60]))

    # -- the application ---------------------------------------------------------
    def telemetry(self, now):
        temp = self.board.temperature()
        self.n += 1
        msg = {"n": self.n, "up": ticks_diff(now, self.start) // 1000, "temp": temp, "mem": gc.mem_free()}
        self.t.send(_TELEMETRY, json.dumps(msg).encode())
        if self.alarm_above is None or temp is None:
            return
        if not self.alarm_on and temp > self.alarm_above:
            self.alarm_on = True
            self.t.send(_TELEMETRY, json.dumps({"alarm": "temp", "temp": temp, "above": self.alarm_above}).encode(),
                        policy="critical")
            self.log("warn", "alarm: temperature %s above %s" % (temp, self.alarm_above))
        elif self.alarm_on and temp < self.alarm_above - 1:
            self.alarm_on = False                # 1 degree of hysteresis

    def command(self, cmd):
        print("app: command %r" % cmd)
        if cmd == "ping":
            reply = "pong"
        elif cmd in ("led on", "led off"):
            self.board.led(cmd == "led on")
            reply = "ok"
        elif cmd == "health":
            reply = json.dumps(self.summary())
        elif cmd == "reboot":
            self.reboot_at = ticks_add(ticks_ms(), 500)   # let the reply leave first
            reply = "ok, rebooting"
        else:
            reply = "unknown command %r (ping, led on, led off, health, reboot)" % cmd
        self.t.send(_COMMANDS, reply.encode())

    def summary(self):
        h = self.t.health()
        return {"up": h["established"], "paths": [[p["name"], p["state"], p["srtt_ms"]] for p in h["paths"]],
                "tx": h.get("tx_bytes"), "rx": h.get("rx_bytes"), "sent": self.n, "replies": self.replies}

    def print_health(self):
        gc.collect()                             # so "heap used" is what is really in use
        h = self.t.health()
        paths = ", ".join("%s %s %s ms loss %s" % (p["name"], p["state"], p["srtt_ms"], p["loss"])
                          for p in h["paths"])
        print("app: health: session %s; %s; tx %s B rx %s B; heap used %d free %d" % (
            "up" if h["established"] else "down", paths, h.get("tx_bytes"), h.get("rx_bytes"),
            gc.mem_alloc(), gc.mem_free()))
