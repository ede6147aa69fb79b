"""Build MicroPython from source with microtun frozen in (issue 10).

    python tools/mpbuild.py TARGET [--src PATH] [-v]

TARGET (artefact under build/, its absolute path printed as the last line):

    unix32-frozen  build/unix32-frozen/micropython   32-bit unix port, cryptolib via mbedtls,
                                                     microtun + firmware frozen (boards/unix/manifest.py)
    unix32         build/unix32/micropython          the same 32-bit build, nothing of microtun
                                                     frozen (boards/unix/base_manifest.py: .mpy deployment)
    qemu           build/qemu-an385/firmware.elf     qemu MPS2_AN385 (Cortex-M3), cryptolib via mbedtls,
                                                     microtun frozen (boards/qemu/manifest.py)
    qemu-test      build/qemu-an385-test/firmware.elf  the qemu board with the portable test modules and
                                                     their helpers frozen too (host_tests/qemu_manifest.py)
    qemu-pyaes     build/qemu-an385-pyaes/firmware.elf  the port's own MPS2_AN385 board, without cryptolib:
                                                     the AEAD on microtun.aes_pure, frozen in
                                                     (boards/qemu/pyaes_manifest.py; tools/bench_qemu.py's
                                                     pure-Python AES figures)

The source is MICROPY_SRC (environment, or --src): a MicroPython v1.28 source
directory (a git checkout with the lib/mbedtls submodule) or the release
tarball. Default: ../shared/micropython/micropython-1.28.0.tar.xz beside the
repository (for a git worktree, also beside its main checkout). A tarball is
unpacked once under build/src/.

Cached: a target is rebuilt only when its inputs change (the source, the
frozen files: lib/microtun, firmware/, boards/, the test modules for
qemu-test, and this script). The stamp is removed before a build and written
after it, the old artefact is removed before a build and the new one put in
place by an atomic rename, so a build that fails or is interrupted leaves
nothing a later run trusts.

Bad input (no source, a wrong path, another MicroPython version, a missing
toolchain) prints one line naming what is missing and how to get it on
stderr, and exits 2. Stdlib only.
"""
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build"
TARBALL = "micropython-1.28.0.tar.xz"
VERSION = (1, 28)
JOBS = str(min(os.cpu_count() or 1, 4))

# Flags every build shares: no btree/ffi (their submodules are not needed),
# cryptolib through mbedtls as the rp2/esp32 ports and the PyPI wheel have it.
UNIX_FLAGS = ["CFLAGS_EXTRA=-m32", "LDFLAGS_EXTRA=-m32", "MICROPY_PY_BTREE=0", "MICROPY_PY_FFI=0",
              "MICROPY_SSL_MBEDTLS=1", "MICROPY_SSL_AXTLS=0",
              # The freeze step compiles microtun/xorbuf.py's viper code for
              # the port's arch (ports/unix sets none; a board port does).
              "MPY_CROSS_FLAGS=-march=x86"]
QEMU_FLAGS = ["BOARD=MPS2_AN385", "MICROPY_PY_BTREE=0"]
# microtun's qemu board (boards/qemu: the port's MPS2_AN385 plus cryptolib
# through mbedtls); a target without it builds the port's own board
OUR_QEMU_BOARD = "BOARD_DIR=" + str(ROOT / "boards" / "qemu")

FROZEN = ("lib/microtun", "firmware", "boards/microtun_manifest.py", "lib/microtun_host/flash.py")
TEST_HEAP = 2 * 1024 * 1024
TARGETS = {
    # name: (port, manifest (repo-relative), artefact (under build/), frozen inputs, extra make flags)
    "unix32-frozen": ("unix", "boards/unix/manifest.py", "unix32-frozen/micropython",
                      FROZEN + ("boards/unix",), ()),
    "unix32": ("unix", "boards/unix/base_manifest.py", "unix32/micropython", ("boards/unix/base_manifest.py",), ()),
    "qemu": ("qemu", "boards/qemu/manifest.py", "qemu-an385/firmware.elf", FROZEN + ("boards/qemu",),
             (OUR_QEMU_BOARD,)),
    # The test image gets a 2 MB heap (the board's 4 MB RAM allows it; the
    # device image keeps the port's 140 KB): some vectors allocate 64 KB.
    "qemu-test": ("qemu", "host_tests/qemu_manifest.py", "qemu-an385-test/firmware.elf",
                  FROZEN + ("boards/qemu", "host_tests"), (OUR_QEMU_BOARD, "MICROPY_HEAP_SIZE=%d" % TEST_HEAP)),
    # The port's own board directory (not OUR_QEMU_BOARD): no mbedtls, so
    # no cryptolib, as on a port built without it
    "qemu-pyaes": ("qemu", "boards/qemu/pyaes_manifest.py", "qemu-an385-pyaes/firmware.elf",
                   FROZEN + ("boards/qemu",), ()),
}

APT = {"unix": "gcc-multilib", "qemu": "gcc-arm-none-eabi libnewlib-arm-none-eabi"}


class Missing(Exception):
    """Something the build needs is not there; the message says what to do."""


def log(verbose, msg):
    if verbose:
        print(msg, file=sys.stderr)


# -- the source ---------------------------------------------------------------------------
def default_sources():
    """Where the shared tarball may be: beside this clone, and for a git
    worktree also beside its main checkout."""
    rel = Path("shared") / "micropython" / TARBALL
    out = [ROOT.parent / rel]
    try:
        common = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--path-format=absolute", "--git-common-dir"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        common = ""
    if common:
        main = Path(common).parent
        if main.parent / rel not in out:
            out.append(main.parent / rel)
    return out


def find_source(arg=None):
    """(kind, path): kind 'dir' or 'tar'. Raises Missing."""
    given = arg or os.environ.get("MICROPY_SRC")
    if given:
        p = Path(given).expanduser()
        if not p.is_absolute():
            p = (Path.cwd() / p)
        if p.is_dir():
            return "dir", p.resolve()
        if p.is_file() and (p.name.endswith((".tar.xz", ".tar.gz", ".tgz", ".tar.bz2", ".tar"))):
            return "tar", p.resolve()
        if p.exists():
            raise Missing("MICROPY_SRC=%s is neither a MicroPython source directory nor a .tar.xz/.tar.gz release tarball" % given)
        raise Missing("MICROPY_SRC=%s does not exist: set MICROPY_SRC to a MicroPython v1.28 checkout or %s" % (given, TARBALL))
    for cand in default_sources():
        if cand.is_file():
            return "tar", cand.resolve()
    raise Missing("no MicroPython source: set MICROPY_SRC to a MicroPython v1.28 checkout or %s "
                  "(looked for %s)" % (TARBALL, default_sources()[0]))


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unpack(tar, verbose):
    """Unpack a tarball once under build/src/; returns the tree's top directory."""
    key = file_digest(tar)[:16]
    dest = BUILD / "src" / ("%s-%s" % (tar.name.split(".tar")[0], key))
    if (dest / ".unpacked").is_file():
        return top_of(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    log(verbose, "unpacking %s" % tar)
    try:
        with tarfile.open(tar) as t:
            if hasattr(tarfile, "data_filter"):
                t.extractall(tmp, filter="data")
            else:
                t.extractall(tmp)
        (tmp / ".unpacked").write_text(str(tar) + "\n")
        os.replace(tmp, dest)
    except (tarfile.TarError, OSError, EOFError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = " ".join(str(e).split())[:200]
        raise Missing("cannot unpack %s (%s): set MICROPY_SRC to a MicroPython v1.28 source or its release tarball" % (tar, why))
    return top_of(dest)


def top_of(d):
    if (d / "py" / "mpconfig.h").is_file():
        return d
    for sub in sorted(d.iterdir()):
        if (sub / "py" / "mpconfig.h").is_file():
            return sub
    raise Missing("%s holds no MicroPython source (no py/mpconfig.h): set MICROPY_SRC to a MicroPython v1.28 source" % d)


def check_source(top, given):
    cfg = top / "py" / "mpconfig.h"
    if not cfg.is_file():
        raise Missing("%s is not a MicroPython source (no py/mpconfig.h): set MICROPY_SRC to a MicroPython v1.28 checkout or %s"
                      % (given, TARBALL))
    text = cfg.read_text(errors="replace")
    ver = []
    for part in ("MAJOR", "MINOR"):
        m = re.search(r"#define MICROPY_VERSION_%s \((\d+)\)" % part, text) or \
            re.search(r"#define MICROPY_VERSION_%s (\d+)" % part, text)
        ver.append(int(m.group(1)) if m else -1)
    if -1 in ver:
        raise Missing("%s: its py/mpconfig.h names no MICROPY_VERSION_MAJOR/MINOR, so its version is unknown: "
                      "set MICROPY_SRC to a MicroPython v1.28 checkout or %s" % (given, TARBALL))
    if tuple(ver) != VERSION:
        raise Missing("%s is MicroPython %d.%d, microtun builds against v%d.%d: set MICROPY_SRC to a v1.28 checkout "
                      "(git checkout v1.28.0) or %s" % (given, ver[0], ver[1], VERSION[0], VERSION[1], TARBALL))
    if not (top / "lib" / "mbedtls" / "library" / "aes.c").is_file():
        raise Missing("%s has no lib/mbedtls sources (cryptolib needs them): run `git submodule update --init lib/mbedtls` "
                      "in it, or set MICROPY_SRC to %s" % (given, TARBALL))


def tree_digest(top, port):
    """Identity of a source directory: paths, sizes and mtimes of what the build reads."""
    h = hashlib.sha256()
    for sub in ("py", "extmod", "shared", "mpy-cross", "tools", "ports/" + port,
                "lib/mbedtls/library", "lib/mbedtls/include", "lib/libm", "lib/libm_dbl", "lib/uzlib",
                "lib/crypto-algorithms", "lib/mbedtls_errors", "lib/re1.5", "lib/littlefs", "lib/oofatfs"):
        base = top / sub
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("build"))
            for f in sorted(filenames):
                p = Path(dirpath) / f
                try:
                    st = p.stat()
                except OSError:
                    continue
                h.update(("%s %d %d\n" % (p.relative_to(top), st.st_size, st.st_mtime_ns)).encode())
    return h.hexdigest()


# -- the toolchain ------------------------------------------------------------------------
def _run_ok(cmd, cwd=None):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def check_toolchain(port):
    if not shutil.which("make"):
        raise Missing("make not found: install the Debian package make (apt-get install make)")
    if port == "unix":
        if not shutil.which("gcc"):
            raise Missing("gcc not found: install the Debian packages gcc gcc-multilib (apt-get install gcc-multilib)")
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "t.c"
            src.write_text("#include <stdio.h>\n#include <math.h>\nint main(void){printf(\"%d\", (int)sizeof(void*));return 0;}\n")
            if not _run_ok(["gcc", "-m32", "-o", str(Path(d) / "t"), str(src), "-lm"]):
                raise Missing("gcc -m32 cannot link a 32-bit program: install the Debian package gcc-multilib "
                              "(apt-get install gcc-multilib)")
    elif port == "qemu":
        if not shutil.which("arm-none-eabi-gcc"):
            raise Missing("arm-none-eabi-gcc not found: install the Debian packages gcc-arm-none-eabi libnewlib-arm-none-eabi")
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "t.c"
            src.write_text("#include <string.h>\n#include <alloca.h>\nint f(char *p){return (int)strlen(p);}\n")
            if not _run_ok(["arm-none-eabi-gcc", "-mthumb", "-mcpu=cortex-m3", "-c", "-o", str(Path(d) / "t.o"), str(src)]):
                raise Missing("arm-none-eabi-gcc has no C library headers: install the Debian package libnewlib-arm-none-eabi")
        if not shutil.which("qemu-system-arm"):
            raise Missing("qemu-system-arm not found (needed to run the firmware): install the Debian package qemu-system-arm")
    if not shutil.which("python3"):
        raise Missing("python3 not found on PATH (MicroPython's build scripts call it): install the Debian package python3")


# -- inputs, cache ------------------------------------------------------------------------
def inputs_digest(paths):
    h = hashlib.sha256()
    for rel in paths:
        base = ROOT / rel
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for p in files:
            if "__pycache__" in p.parts or p.suffix in (".pyc", ".mpy"):
                continue
            h.update(str(p.relative_to(ROOT)).encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


def make_cmd(top, port, flags, objdir, mpycross, manifest, libdir):
    cmd = ["make", "-C", str(top / "ports" / port), "-j" + JOBS, "BUILD=" + str(objdir),
           "MICROPY_MPYCROSS=" + str(mpycross), "MICROPY_MPYCROSS_DEPENDENCY=" + str(mpycross),
           "MPY_LIB_DIR=" + str(libdir), "FROZEN_MANIFEST=" + str(manifest)]
    return cmd + list(flags)


def run_make(cmd, verbose, what):
    log(verbose, " ".join(cmd))
    r = subprocess.run(cmd, stdout=None if verbose else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        tail = (r.stdout or "").strip().splitlines()[-25:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise BuildFailed("%s failed (exit %d); the output's tail is above: rerun with -v for all of it"
                          % (what, r.returncode))


class BuildFailed(Exception):
    pass


def build(target, src_arg=None, verbose=False):
    if target not in TARGETS:
        raise Missing("unknown target %r: one of %s" % (target, ", ".join(TARGETS)))
    port, manifest, artefact, inputs, target_flags = TARGETS[target]
    kind, given = find_source(src_arg)
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(BUILD / ".mpbuild.lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)       # one build at a time (pytest and benchmarks may race)
        top = unpack(given, verbose) if kind == "tar" else given
        check_source(top, given)
        check_toolchain(port)
        src_id = file_digest(given) if kind == "tar" else tree_digest(top, port)
        script_id = file_digest(Path(__file__))
        flags = (UNIX_FLAGS if port == "unix" else QEMU_FLAGS) + list(target_flags)
        # The object directory is keyed by source and flags: objects of another
        # source never meet this one (tarball mtimes could make them look newer).
        port_cfg = (inputs_digest(["boards/qemu/mpconfigboard.mk", "boards/qemu/mbedtls_config_port.h"])
                    if OUR_QEMU_BOARD in flags else "")
        obj_key = hashlib.sha256(("%s\n%s\n%s\n%s" % (top, src_id, flags, port_cfg)).encode()).hexdigest()[:16]
        frozen_id = inputs_digest(inputs)
        key = "%s %s %s" % (obj_key, frozen_id, script_id[:16])

        out = BUILD / artefact
        stamp = out.parent / ".stamp"
        if out.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
            return out
        for stale in (stamp, out):         # nothing of an older build stays to be trusted
            if stale.exists():
                stale.unlink()
        out.parent.mkdir(parents=True, exist_ok=True)

        objroot = BUILD / "obj"
        # Shared by a port's targets with the same flags: only the frozen part differs.
        objdir = objroot / (port + "".join("-" + f.split("=")[0].lower() for f in target_flags))
        keyfile = objdir / ".key"
        if objdir.exists() and not (keyfile.is_file() and keyfile.read_text().strip() == obj_key):
            shutil.rmtree(objdir)
        objdir.mkdir(parents=True, exist_ok=True)
        keyfile.write_text(obj_key + "\n")

        # mpy-cross, shared by the targets built from this source.
        mpx_dir = objroot / ("mpy-cross-" + hashlib.sha256(("%s\n%s" % (top, src_id)).encode()).hexdigest()[:16])
        mpycross = mpx_dir / "mpy-cross"
        if not (mpx_dir / ".ok").is_file():
            run_make(["make", "-C", str(top / "mpy-cross"), "-j" + JOBS, "BUILD=" + str(mpx_dir)], verbose, "building mpy-cross")
            (mpx_dir / ".ok").write_text("ok\n")

        libdir = objroot / "no-micropython-lib"      # the freeze step wants $(MPY_LIB_DIR)/README.md
        libdir.mkdir(parents=True, exist_ok=True)
        (libdir / "README.md").touch()

        # makemanifest.py regenerates frozen_content.c (and each frozen .mpy)
        # only when a file is newer than it, not when the manifest changed or a
        # file came back with an older mtime: the targets sharing this
        # directory freeze different sets, so the frozen part is always redone
        # (a few seconds).
        for f in ("frozen_content.c", "frozen_content.o"):
            if (objdir / f).exists():
                (objdir / f).unlink()
        shutil.rmtree(objdir / "frozen_mpy", ignore_errors=True)
        run_make(make_cmd(top, port, flags, objdir, mpycross, ROOT / manifest, libdir), verbose,
                 "building %s" % target)
        built = objdir / ("micropython" if port == "unix" else "firmware.elf")
        if not built.is_file():
            raise BuildFailed("building %s: make succeeded but %s is missing" % (target, built))
        tmp = out.with_name(out.name + ".tmp")
        shutil.copy2(built, tmp)
        os.replace(tmp, out)
        stamp.write_text(key + "\n")
        return out


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("target", choices=sorted(TARGETS))
    ap.add_argument("--src", help="MicroPython source directory or release tarball (default: $MICROPY_SRC)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the build's output")
    a = ap.parse_args(argv)
    try:
        out = build(a.target, a.src, a.verbose)
    except Missing as e:
        print("mpbuild: %s" % e, file=sys.stderr)
        return 2
    except BuildFailed as e:
        print("mpbuild: %s" % e, file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
