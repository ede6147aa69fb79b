# A unix-port build with microtun frozen in (tools/mpbuild.py unix32-frozen,
# `make unix32-frozen`); by hand, from a MicroPython v1.28 source tree:
#   make -C ports/unix MICROPY_PY_BTREE=0 MICROPY_PY_FFI=0 MICROPY_SSL_MBEDTLS=1 MICROPY_SSL_AXTLS=0 \
#        MPY_LIB_DIR=/dir/with/an/empty/README.md FROZEN_MANIFEST=/abs/path/to/microtun/boards/unix/manifest.py
# Needs nothing from micropython-lib (the unix variants' own manifest does).
include("base_manifest.py")
include("../microtun_manifest.py", cryptolib=True)
