"""`microtun pop --config FILE` with broken configs: exit status 2 and ONE
line naming the file, the field path and what was expected. One row per
case; a few rows also run as a real process to check there is no traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from microtun_host import cli, pop
from microtun_host.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
KEY1 = "11" * 32
KEY2 = "22" * 32


def good():
    return {
        "name": "pop-a",
        "listen": "127.0.0.1:7100",
        "control": "127.0.0.1:7101",
        "log_level": "info",
        "stats_interval": 60,
        "routes": [
            {"in_label": 100, "in_key": KEY1, "next": "127.0.0.1:7200", "out_label": 200, "out_key": KEY2},
            {"in_label": 201, "in_key": KEY2, "next": "learn:100", "out_label": 101, "out_key": KEY1},
        ],
    }


def edit(path, value):
    """A good config with the field at path (list of keys/indexes) set to
    value, or deleted when value is DELETE."""
    def f():
        cfg = good()
        obj = cfg
        for k in path[:-1]:
            obj = obj[k]
        if value is DELETE:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
        return json.dumps(cfg)
    return f


DELETE = object()

# (case, file text or a function returning it, expected fragment after "<file>: ")
CASES = [
    ("missing name", edit(["name"], DELETE), "name: missing (expected a string)"),
    ("missing routes", edit(["routes"], DELETE), "routes: missing (expected a list [...])"),
    ("missing out_key", edit(["routes", 1, "out_key"], DELETE),
     "routes[1].out_key: missing (expected 64 hex characters (a 32-byte key))"),
    ("missing next", edit(["routes", 0, "next"], DELETE), "routes[0].next: missing (expected"),
    ("short key", edit(["routes", 1, "in_key"], "abcdef0123"),
     "routes[1].in_key: expected 64 hex characters (a 32-byte key), got 10 characters"),
    ("non-hex key", edit(["routes", 0, "out_key"], "zz" + KEY1[2:]),
     "routes[0].out_key: expected 64 hex characters (a 32-byte key), got 'z' at position 1"),
    ("key not a string", edit(["routes", 0, "in_key"], 12),
     "routes[0].in_key: expected 64 hex characters (a 32-byte key), got the integer 12"),
    ("host name", edit(["listen"], "localhost:7100"),
     "listen: expected \"a.b.c.d:port\" or \"[IPv6]:port\" with a numeric address, got the string \"localhost:7100\""),
    ("port out of range", edit(["routes", 0, "next"], "127.0.0.1:70000"), "routes[0].next: expected"),
    ("no port", edit(["listen"], "127.0.0.1"), "listen: expected"),
    ("v6 without brackets", edit(["listen"], "::1:7100"), "listen: expected"),
    ("next port 0", edit(["routes", 0, "next"], "127.0.0.1:0"),
     "routes[0].next: expected a next hop with a port in 1..65535, got 127.0.0.1:0"),
    ("bad IPv4", edit(["routes", 0, "next"], "127.0.0.256:7200"), "routes[0].next: expected"),
    ("family mismatch", edit(["routes", 0, "next"], "[::1]:7200"),
     "routes[0].next: IPv6 next hop [::1]:7200 but listen 127.0.0.1:7100 is IPv4"),
    ("next is self", edit(["routes", 0, "next"], "127.0.0.1:7100"), "routes[0].next: next hop 127.0.0.1:7100 is this PoP's own"),
    ("learn bad label", edit(["routes", 1, "next"], "learn:abc"),
     "routes[1].next: expected \"learn:<in_label>\" with a label in 1..16777215"),
    ("learn unknown label", edit(["routes", 1, "next"], "learn:555"),
     "routes[1].next: learn:555 names no route's in_label"),
    ("learn own label", edit(["routes", 1, "next"], "learn:201"), "routes[1].next: learn:201 is this route's own in_label"),
    ("control not loopback", edit(["control"], "10.1.2.3:7101"),
     "control: expected a loopback address (127.0.0.0/8 or [::1]), got \"10.1.2.3:7101\""),
    ("duplicate label", edit(["routes", 1, "in_label"], 100),
     "routes[1].in_label: duplicate in_label 100 (already routes[0].in_label)"),
    ("label 0", edit(["routes", 0, "in_label"], 0), "routes[0].in_label: expected an integer in 1..16777215, got 0"),
    ("label 2^24", edit(["routes", 1, "out_label"], 1 << 24),
     "routes[1].out_label: expected an integer in 1..16777215, got 16777216"),
    ("label as string", edit(["routes", 0, "in_label"], "100"),
     "routes[0].in_label: expected an integer in 1..16777215, got the string \"100\""),
    ("label as bool", edit(["routes", 0, "out_label"], True),
     "routes[0].out_label: expected an integer in 1..16777215, got true"),
    ("log level", edit(["log_level"], "loud"),
     "log_level: expected one of \"debug\", \"info\", \"warning\", \"error\", got \"loud\""),
    ("stats interval", edit(["stats_interval"], -1), "stats_interval: expected a number in 0..86400, got -1"),
    ("typo in field", edit(["routes", 0, "in_lable"], 5), "routes[0].in_lable: unknown field (expected one of: in_label"),
    ("typo at top", edit(["rout"], []), "rout: unknown field (expected one of: name, listen"),
    ("routes not a list", edit(["routes"], {"a": 1}), "routes: expected a list [...], got an object"),
    ("route not an object", edit(["routes", 1], 7), "routes[1]: expected an object {...}, got the integer 7"),
    ("empty name", edit(["name"], " "), "name: expected a non-empty string"),
    ("not JSON", "{\"name\": \"pop-a\",\n \"listen\" \"127.0.0.1:1\"}", "not valid JSON: Expecting ':' delimiter (line 2, column 11)"),
    ("trailing comma", "{\"name\": \"x\",}", "not valid JSON: "),
    ("empty file", "", "not valid JSON: Expecting value (line 1, column 1)"),
    ("top-level list", "[1, 2]", "top level: expected a JSON object {...}, got a list"),
    ("not UTF-8", b"\xff\xfe{}", "not valid JSON: not UTF-8 text"),
]


def write(tmp_path, text):
    path = tmp_path / "pop.json"
    if callable(text):
        text = text()
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("case,text,want", CASES, ids=[c[0] for c in CASES])
def test_broken_config_exits_2_with_one_line(tmp_path, capsys, case, text, want):
    path = write(tmp_path, text)
    rc = cli.main(["pop", "--config", str(path)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("microtun pop: %s: " % path), lines[0]
    assert want in lines[0], lines[0]
    # the loader raises exactly that line, for reuse by reload and provisioning
    with pytest.raises(ConfigError) as e:
        pop.load_config(path)
    assert "\n" not in str(e.value) and lines[0].endswith(str(e.value))


def test_missing_file_and_directory(tmp_path, capsys):
    for path, want in ((tmp_path / "nope.json", "cannot read: No such file or directory"),
                       (tmp_path, "cannot read: Is a directory")):
        assert cli.main(["pop", "--config", str(path)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == ["microtun pop: %s: %s" % (path, want)]


VALID = [
    ("as given", good),
    ("minimal", lambda: {"name": "p", "listen": "0.0.0.0:7000", "routes": []}),
    ("comments", lambda: dict(good(), _comment="edge PoP", routes=[dict(good()["routes"][0], _why="uplink")])),
    ("ipv6", lambda: dict(good(), listen="[::]:7100", control="[::1]:7101",
                          routes=[dict(good()["routes"][0], next="[2001:db8::7]:7200"), good()["routes"][1]])),
    ("upper-case hex", lambda: dict(good(), routes=[dict(good()["routes"][0], in_key=KEY1.upper().replace("1", "A"))])),
    ("label extremes", lambda: dict(good(), routes=[dict(good()["routes"][0], in_label=1, out_label=16777215)])),
]


@pytest.mark.parametrize("case,make", VALID, ids=[c[0] for c in VALID])
def test_valid_configs_load(tmp_path, capsys, case, make):
    path = write(tmp_path, json.dumps(make()))
    assert cli.main(["pop", "--config", str(path), "--check"]) == 0
    assert "ok: PoP" in capsys.readouterr().out
    cfg = pop.load_config(path)
    assert len(cfg.routes) == len(make()["routes"])


def test_defaults_and_parsed_values(tmp_path):
    cfg = pop.load_config(write(tmp_path, json.dumps({"name": "p", "listen": "[::1]:7000", "routes": [
        {"in_label": 5, "in_key": KEY1, "next": "[::1]:7001", "out_label": 6, "out_key": KEY2}]})))
    assert (cfg.log_level, cfg.stats_interval, cfg.control) == ("info", 60, None)
    assert cfg.listen.family == 6 and cfg.listen.sockaddr == ("::1", 7000) and str(cfg.listen) == "[::1]:7000"
    r = cfg.routes[0]
    assert r.in_key == bytes.fromhex(KEY1) and r.next_addr.sockaddr == ("::1", 7001) and r.learn_from == 0


@pytest.mark.parametrize("case", ["missing name", "not JSON", "duplicate label"])
def test_real_process_exits_2_without_traceback(tmp_path, case):
    text, want = {c[0]: (c[1], c[2]) for c in CASES}[case]
    path = write(tmp_path, text)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "lib"))
    p = subprocess.run([sys.executable, "-m", "microtun_host.cli", "pop", "--config", str(path)],
                       capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.count("\n") == 1 and want in p.stderr and "Traceback" not in p.stderr


def test_cli_without_command_is_usage_error(capsys):
    assert cli.main([]) == 2
    assert "pop" in capsys.readouterr().err
