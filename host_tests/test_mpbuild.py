"""tools/mpbuild.py: bad input gets one line and exit 2; each artefact is
what PATHS promise (32-bit, cryptolib, exactly the device's modules frozen,
or none). The image tests build through mpbuild (cached) and are skipped
with its one line where the source or a toolchain is missing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "tools"))
from microtun_host.flash import device_modules, FW_MODULES  # noqa: E402

RUN_LAST = True          # after the fast tests: a cold build takes minutes (conftest orders items)
MPBUILD = [sys.executable, str(ROOT / "tools" / "mpbuild.py")]


def mpbuild(*args, env=None):
    return subprocess.run(MPBUILD + list(args), capture_output=True, text=True, timeout=1200, cwd=str(ROOT),
                          env=env)


def artefact(target):
    r = mpbuild(target)
    if r.returncode == 2:
        pytest.skip(r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, r.stderr[-3000:]
    path = r.stdout.strip().splitlines()[-1]
    assert os.path.isabs(path) and os.path.isfile(path)
    return path


def one_line_exit_2(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpbuild: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_missing_source_names_the_setting(tmp_path):
    one_line_exit_2(mpbuild("unix32", "--src", str(tmp_path / "nope")), "does not exist", "MICROPY_SRC")
    env = dict(os.environ, MICROPY_SRC=str(tmp_path / "nope"))
    one_line_exit_2(mpbuild("qemu", env=env), "MICROPY_SRC")


def test_not_a_source_tree_or_tarball(tmp_path):
    one_line_exit_2(mpbuild("unix32", "--src", str(tmp_path)), "no py/mpconfig.h", "MICROPY_SRC")
    f = tmp_path / "notes.txt"
    f.write_text("x")
    one_line_exit_2(mpbuild("unix32", "--src", str(f)), "neither", "tarball")
    bad = tmp_path / "broken.tar.xz"
    bad.write_bytes(b"not an archive")
    one_line_exit_2(mpbuild("unix32", "--src", str(bad)), "cannot unpack", "MICROPY_SRC")


def test_another_version_is_refused(tmp_path):
    (tmp_path / "py").mkdir()
    (tmp_path / "py" / "mpconfig.h").write_text("#define MICROPY_VERSION_MAJOR (1)\n#define MICROPY_VERSION_MINOR (22)\n")
    one_line_exit_2(mpbuild("unix32-frozen", "--src", str(tmp_path)), "1.22", "v1.28")


def test_a_source_naming_no_version_is_refused(tmp_path):
    (tmp_path / "py").mkdir()
    (tmp_path / "py" / "mpconfig.h").write_text('#define MICROPY_VERSION_STRING "1.28.0"\n')
    one_line_exit_2(mpbuild("unix32", "--src", str(tmp_path)), "version is unknown", "v1.28")


def test_checkout_without_mbedtls_submodule(tmp_path):
    (tmp_path / "py").mkdir()
    (tmp_path / "py" / "mpconfig.h").write_text("#define MICROPY_VERSION_MAJOR (1)\n#define MICROPY_VERSION_MINOR (28)\n")
    one_line_exit_2(mpbuild("unix32", "--src", str(tmp_path)), "git submodule update --init lib/mbedtls")


def test_missing_toolchain_names_the_debian_package(tmp_path):
    # A PATH holding only what is not the toolchain under test.
    import shutil
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("make", "python3", "git"):
        w = shutil.which(tool)
        if w:
            (fake / tool).symlink_to(w)
    if mpbuild("unix32").returncode == 2 and "source" in mpbuild("unix32").stderr:
        pytest.skip("no MicroPython source here: the toolchain check comes after the source check")
    env = dict(os.environ, PATH=str(fake))
    one_line_exit_2(mpbuild("unix32", env=env), "gcc", "gcc-multilib")
    one_line_exit_2(mpbuild("qemu", env=env), "arm-none-eabi-gcc", "gcc-arm-none-eabi")


def _frozen_microtun(exe):
    """The microtun modules importable with nothing but the frozen path."""
    names = sorted(p.stem for p in (ROOT / "lib" / "microtun").glob("*.py"))
    code = ("import sys\nok = []\nfor n in %r:\n"
            "    try:\n        __import__('microtun.' + n)\n        ok.append(n)\n"
            "    except ImportError:\n        pass\nprint(sorted(ok))\n" % names)
    env = dict(os.environ, MICROPYPATH=".frozen")
    r = subprocess.run([exe, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd="/")
    assert r.returncode == 0, r.stderr
    return eval(r.stdout.strip().splitlines()[-1])


def _probe(exe, code):
    env = dict(os.environ, MICROPYPATH=".frozen")
    r = subprocess.run([exe, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd="/")
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_unix32_frozen_is_32_bit_with_the_device_modules_frozen():
    exe = artefact("unix32-frozen")
    assert _probe(exe, "import sys, cryptolib; print(sys.maxsize == 2**31 - 1, cryptolib.aes(bytes(16), 1).encrypt(bytes(16)).hex())") \
        == ["True", "66e94bd4ef8a2c3b884cfa59ca342b2e"]       # FIPS-197 / AES-128 zero key, zero block
    assert _frozen_microtun(exe) == device_modules(cryptolib=True)
    fw = [m[:-3] for m in FW_MODULES]
    assert _probe(exe, "import %s; print('ok')" % ", ".join(fw)) == ["ok"]


def test_unix32_is_32_bit_with_nothing_of_microtun_frozen():
    exe = artefact("unix32")
    assert _probe(exe, "import sys, cryptolib, asyncio; print(sys.maxsize == 2**31 - 1)") == ["True"]
    assert _frozen_microtun(exe) == []
    assert _probe(exe, "try:\n import microtun_fw\nexcept ImportError:\n print('absent')") == ["absent"]


def test_qemu_device_image_boots_with_cryptolib_and_the_device_modules():
    elf = artefact("qemu")
    from qemuboard import QemuBoard
    names = sorted(p.stem for p in (ROOT / "lib" / "microtun").glob("*.py"))
    # A module counts as frozen when its import gets past finding it; one
    # that is frozen but imports what the port lacks is listed with why.
    code = ("import sys, gc, cryptolib\nprint(sys.platform, sys.maxsize == 2**31 - 1, "
            "cryptolib.aes(bytes(16), 1).encrypt(bytes(16)).hex())\nok = []\nneeds = {}\nfor n in %r:\n"
            "    try:\n        __import__('microtun.' + n)\n        ok.append(n)\n"
            "    except ImportError as e:\n        if ('microtun.' + n) not in str(e):\n            needs[n] = str(e)\n"
            "print(sorted(ok))\nprint(needs)\n" % names)
    with QemuBoard(elf) as b:
        out, err = b.exec(code, timeout=120)
    assert err == ""
    first, frozen, needs = out.strip().splitlines()[-3:]
    assert first.split() == ["qemu", "True", "66e94bd4ef8a2c3b884cfa59ca342b2e"]
    # The qemu port has no network: the driver (sockets) is frozen but cannot
    # be imported there; everything else the device needs imports.
    assert eval(needs) == {"driver": "no module named 'socket'"}
    assert sorted(eval(frozen) + ["driver"]) == device_modules(cryptolib=True)


def test_qemu_pyaes_image_has_no_cryptolib_and_seals_with_the_pure_aes():
    # tools/bench_qemu.py's second image: the port's own board, so the AEAD
    # runs on microtun.aes_pure (frozen there only); its bytes are CPython's
    elf = artefact("qemu-pyaes")
    from qemuboard import QemuBoard
    from microtun.aead import AEAD
    key, nonce, ad, msg = bytes(range(32)), bytes(range(12)), b"hdr", b"pure AES on a Cortex-M3"
    code = ("try:\n import cryptolib\n print('cryptolib')\nexcept ImportError:\n print('none')\n"
            "from microtun.aead import AEAD\na = AEAD(%r)\nc = a.seal(%r, %r, %r)\n"
            "print(a.backend, c.hex(), a.open(%r, c, %r) == %r)\n" % (key, nonce, msg, ad, nonce, ad, msg))
    with QemuBoard(elf) as b:
        out, err = b.exec(code, timeout=120)
    assert err == ""
    lines = out.strip().splitlines()
    assert lines[-2] == "none"
    backend, sealed, opened = lines[-1].split()
    assert (backend, opened) == ("pure", "True")
    assert sealed == AEAD(key).seal(nonce, msg, ad).hex()
