"""Bringing the network up (docs/FIRMWARE.md): board.network_up() with
retries, and the Wi-Fi join the Wi-Fi boards share. Loaded by microtun_fw
at boot and again when the link drops, and dropped once the network is up:
a link lost while the tunnel runs loads only this, not the start-up code.

    microtun_net.network_up(fw)      # returns once the network is up
    wifi_connect(net, timeout_ms, feed, setup)   # a Wi-Fi board's board.network_up()
"""
from time import ticks_ms, ticks_diff, ticks_add, sleep_ms


def network_up(fw):
    """board.network_up(), retried with a growing delay until it works."""
    delay = fw.s["net_retry_ms"]
    attempt = 0
    while True:
        attempt += 1
        fw.feed()
        try:
            what = fw.board.network_up(fw.cfg.network, fw.s["net_timeout_ms"], fw.feed)
            fw.log("info", "network up: %s" % what)
            return
        except OSError as e:
            level = "warn" if attempt == 1 or attempt % 20 == 0 else "info"
            fw.log(level, "network attempt %d failed: %s; next in %d s" % (attempt, e, delay // 1000))
        fw.sleep(delay)
        delay = min(delay * 2, fw.s["net_retry_max_ms"])


# -- Wi-Fi, shared by the Wi-Fi boards ------------------------------------------------------
_FAIL = ("STAT_WRONG_PASSWORD", "STAT_NO_AP_FOUND", "STAT_CONNECT_FAIL")


def wifi_connect(net, timeout_ms, feed, setup=None):
    """Join the Wi-Fi network in `net` ({"ssid", "password", optional
    "country", "hostname"}) as a station. Returns a short description;
    raises OSError with the reason (the firmware retries with backoff)."""
    import network
    for name in ("country", "hostname"):
        if net.get(name):
            try:
                getattr(network, name)(net[name])
            except (AttributeError, ValueError, OSError):
                pass
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if setup is not None:
        setup(wlan)
    if not wlan.isconnected():
        wlan.connect(net["ssid"], net.get("password", ""))
        end = ticks_add(ticks_ms(), timeout_ms)
        fail = [getattr(network, n) for n in _FAIL if hasattr(network, n)]
        while not wlan.isconnected() and ticks_diff(end, ticks_ms()) > 0:
            if wlan.status() in fail:
                break
            feed()
            sleep_ms(100)
        if not wlan.isconnected():
            st = wlan.status()
            why = "timed out after %d ms" % timeout_ms
            for n in _FAIL:
                if getattr(network, n, None) == st:
                    why = n[5:].lower().replace("_", " ")
            try:
                wlan.disconnect()
            except OSError:
                pass
            raise OSError("Wi-Fi %r: %s (status %s)" % (net["ssid"], why, st))
    return "Wi-Fi %r, address %s" % (net["ssid"], wlan.ifconfig()[0])
