# Freezes microtun into a custom MicroPython firmware: the portable package
# (lib/microtun) and the firmware runtime (firmware/microtun_fw.py and
# firmware/microtun_boot.py). Included by each board's manifest.py; paths
# are relative to this file.
#
# Frozen code runs from flash: it costs no heap for bytecode, where .mpy
# files on the filesystem are loaded into RAM (docs/FIRMWARE.md, "Memory").
# main.py, boot.py, app.py, board.py and microtun.json stay on the
# filesystem so they can be edited and re-flashed without a firmware build.
import os

options.defaults(cryptolib=True)

_skip = ("aes_pure.py",) if options.cryptolib else ()
package("microtun", files=sorted(f for f in os.listdir("../lib/microtun")
                                 if f.endswith(".py") and f not in _skip), base_path="../lib")
module("microtun_fw.py", base_path="../firmware")
module("microtun_boot.py", base_path="../firmware")
