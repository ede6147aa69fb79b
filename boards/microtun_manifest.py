# Freezes microtun into a custom MicroPython firmware: the portable package
# modules the device imports (the same set `microtun flash` copies: gateway-
# only modules stay out, aes_pure only without cryptolib) and the firmware
# runtime (microtun_host.flash.FW_MODULES: firmware/microtun_fw.py, and the
# modules it loads for a while and drops: microtun_boot, microtun_net,
# microtun_rare, the update loader microtun_slot). Included by each board's
# manifest.py; paths are relative to this file.
#
# Frozen code runs from flash: it costs no heap for bytecode, where .mpy
# files on the filesystem are loaded into RAM (docs/FIRMWARE.md, "Figures").
# main.py, boot.py, app.py, board.py and microtun.json stay on the
# filesystem so they can be edited and re-flashed without a firmware build.
#
# microtun/xorbuf.py is viper (native) code: the freeze step compiles it
# with the port's MPY_CROSS_FLAGS -march (esp32 xtensawin, rp2 armv6m, the
# qemu MPS2_AN385 armv7m; the unix port sets none, so tools/mpbuild.py
# passes -march=x86). A port whose freeze has no -march fails with
# "invalid arch" on it: pass MPY_CROSS_FLAGS=-march=<arch> to make.
#
# The modules of microtun_host.flash.FROZEN_NATIVE (the endpoint, the
# handshake, the keypair and the session) are frozen as native code the same
# way: a copy of each with @micropython.native on every function
# (flash.native_source), written to a temporary directory for this freeze.
# A native function's frame is on the C stack, not the GC heap: through
# rekeys the frozen endpoint needs 0.25-0.5K less heap (flash.py says why).
import atexit
import os
import shutil
import sys
import tempfile

options.defaults(cryptolib=True)

sys.path.insert(0, os.path.abspath("../lib"))
from microtun_host.flash import device_modules, FW_MODULES, FROZEN_NATIVE, native_source  # noqa: E402  (stdlib only)

_mods = device_modules(options.cryptolib)
_native = [m for m in FROZEN_NATIVE if m in _mods]
package("microtun", files=[m + ".py" for m in _mods if m not in _native], base_path="../lib")
if _native:
    _tmp = tempfile.mkdtemp(prefix="microtun-native-")
    atexit.register(shutil.rmtree, _tmp, True)      # after the freeze: makemanifest.py reads it until it exits
    os.mkdir(os.path.join(_tmp, "microtun"))
    # the copies carry the newest of their source's and flash.py's times, so
    # that makemanifest.py compiles them again when either changed, not on every build
    _t = os.stat(os.path.abspath("../lib/microtun_host/flash.py")).st_mtime
    for _m in _native:
        _src = os.path.abspath("../lib/microtun/%s.py" % _m)
        _dst = os.path.join(_tmp, "microtun", _m + ".py")
        with open(_src) as _f:
            _text = native_source(_f.read(), _src)
        with open(_dst, "w") as _f:
            _f.write(_text)
        _mt = max(_t, os.stat(_src).st_mtime)
        os.utime(_dst, (_mt, _mt))
    package("microtun", files=[m + ".py" for m in _native], base_path=_tmp)
for _m in FW_MODULES:
    module(_m, base_path="../firmware")
