"""The device config (microtun.config): validation into plain Settings, one
clear line per problem, and forget(), which lets the validation code leave
a device's heap once the config is loaded."""
import gc
import sys

import microtun
from microtun import config
from mtest import raises, MICROPYTHON

PORTABLE = True

KEY = "ab" * 32


def good(**over):
    d = {"name": "dev1", "private_key": KEY, "gateway_public_key": "cd" * 32, "psk": None,
         "paths": [{"name": "a", "pop": "127.0.0.1:7000", "label": 10, "rx_label": 20, "hop_key": "01" * 32},
                   {"name": "b", "pop": "[::1]:7001", "label": 11, "rx_label": 21, "hop_key": "02" * 32}]}
    d.update(over)
    return d


def test_valid_config_becomes_settings():
    s = config.from_dict(good(policy="critical", nat_keepalive_s=30, app={"x": 1}), "dev.json")
    assert s.name == "dev1" and s.private_key == bytes.fromhex(KEY) and s.psk is None
    assert s.gateway_public == b"\xcd" * 32 and s.source == "dev.json"
    assert [p.name for p in s.paths] == ["a", "b"]
    assert s.paths[0].pop == ("127.0.0.1", 7000) and s.paths[1].pop == ("::1", 7001)
    assert s.paths[1].label == 11 and s.paths[1].rx_label == 21 and s.paths[1].hop_key == b"\x02" * 32
    assert s.policy == "critical" and s.nat_keepalive_ms == 30000 and s.window == 1024
    assert s.app == {"x": 1} and s.network == {} and s.watchdog_ms == 0 and s.state_dir == "."


def test_each_problem_is_one_line_naming_the_field():
    two = good()["paths"]
    for d, words in [
        ([1], ["dev.json", "JSON object"]),
        (good(private_key="zz" * 32), ["private_key", "non-hex"]),
        (good(gateway_public_key=None), ["gateway_public_key", "missing"]),
        (good(paths=[]), ["paths", "non-empty"]),
        (good(paths=[dict(two[0], pop="nohost")]), ["paths[0].pop", "host:port"]),
        (good(paths=[dict(two[0], pop="h:99999")]), ["paths[0].pop", "1..65535"]),
        (good(paths=[two[0], dict(two[1], rx_label=20)]), ["paths[1].rx_label", "another path"]),
        (good(policy="fast"), ["policy", "best, critical, adaptive"]),
        (good(window=10), ["window", "64 to 65536"]),
        (good(watchdog_s=True), ["watchdog_s"]),
        (good(network=[]), ["network", "object"]),
    ]:
        e = raises(config.ConfigError, config.from_dict, d, "dev.json")
        msg = str(e)
        assert "\n" not in msg and msg.startswith("dev.json"), msg
        for w in words:
            assert w in msg, (w, msg)


def test_broken_json_and_missing_file_name_the_file():
    e = raises(config.ConfigError, config.loads, "{not json", "x.json")
    assert "x.json" in str(e) and "JSON" in str(e)
    e = raises(config.ConfigError, config.load, "/nonexistent/microtun.json")
    assert "/nonexistent/microtun.json" in str(e) and "provision" in str(e)


def test_settings_hold_no_code():
    # nothing reachable from a Settings object refers to the module's
    # functions: keeping the config keeps no validation code alive
    s = config.from_dict(good())
    for obj in [s] + s.paths:
        cls = type(obj)
        assert not [k for k in dir(cls) if not k.startswith("__") and callable(getattr(cls, k))]


def test_forget_unloads_and_reimport_works():
    saved = sys.modules["microtun.config"]
    try:
        import microtun.config
        s = microtun.config.from_dict(good())
        microtun.config.forget()
        assert "microtun.config" not in sys.modules
        assert getattr(microtun, "config", None) is None
        assert s.paths[0].label == 10                 # the settings stay usable
        from microtun import config as again          # loads it anew
        assert again is not saved and again.from_dict(good()).name == "dev1"
    finally:
        sys.modules["microtun.config"] = saved
        microtun.config = saved


def test_forgotten_code_leaves_the_heap():
    # MicroPython: load the module fresh, validate, forget; the heap in use
    # goes back to about what it was before the import plus the settings
    if not MICROPYTHON:
        return
    saved = sys.modules.pop("microtun.config")
    del microtun.config
    try:
        gc.collect()
        base = gc.mem_alloc()
        from microtun import config as fresh
        s = fresh.from_dict(good())
        gc.collect()
        loaded = gc.mem_alloc() - base
        fresh.forget()
        fresh = None
        gc.collect()
        kept = gc.mem_alloc() - base
        assert s.name == "dev1"
        assert loaded > 3000 and kept < loaded // 2, (loaded, kept)
    finally:
        sys.modules["microtun.config"] = saved
        microtun.config = saved


# -- send checks (issue 11, item 10): an unknown policy, a channel the config does not list ----
def _core(**over):
    from stack_sim import make_config
    from microtun.tunnel import TunnelCore
    cfg = make_config()
    for k in over:
        setattr(cfg, k, over[k])
    logged = []
    return TunnelCore(cfg, 1, log=lambda level, msg: logged.append((level, msg))), logged


def test_channels_field():
    assert config.from_dict(good()).channels is None                 # absent: every channel
    assert config.from_dict(good(channels=[1, 7])).channels == (1, 7)
    for bad in ([0], [256], ["1"], [True], 3):
        e = raises(config.ConfigError, config.from_dict, good(channels=bad), "d.json")
        assert str(e).startswith("d.json: channels: expected a list of channel numbers 1..255"), str(e)


def test_misspelt_policy_is_a_value_error_naming_the_policies():
    core, _ = _core()
    e = raises(ValueError, core.send, 1, b"x", 0, "critcal")
    assert "best, critical, adaptive" in str(e) and "'critcal'" in str(e), str(e)
    assert core.device.stats.get("data_tx", 0) == 0 and not core.device._queue
    for ok in (None, "best", "critical", "adaptive"):
        assert core.send(1, b"x", 0, ok) is True


def test_channel_not_in_the_config_is_refused_counted_and_logged():
    core, logged = _core(channels=(1, 2))
    assert core.send(1, b"ok", 0) is True
    for _ in range(3):
        assert core.send(3, b"no", 0) is False
    assert core.stats["channel_denied"] == 3
    assert len(core.device._queue) == 1, "a refused message was queued for the gateway"
    warn = [m for lvl, m in logged if lvl == "warn"]
    assert warn == ["channel 3 is not in this device's config (channels 1, 2): not sent (1 refused)"], warn
    core2, _ = _core()                                              # no "channels": nothing refused here
    assert core2.send(3, b"x", 0) is True
