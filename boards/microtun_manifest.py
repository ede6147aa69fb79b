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
import os
import sys

options.defaults(cryptolib=True)

sys.path.insert(0, os.path.abspath("../lib"))
from microtun_host.flash import device_modules, FW_MODULES  # noqa: E402  (stdlib only)

package("microtun", files=[m + ".py" for m in device_modules(options.cryptolib)], base_path="../lib")
for _m in FW_MODULES:
    module(_m, base_path="../firmware")
