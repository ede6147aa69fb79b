# microtun frozen into the qemu MPS2_AN385 firmware (tools/mpbuild.py qemu,
# `make qemu`). The qemu port has no asyncio and no network: the firmware
# runtime is frozen as on a real board, the tunnel runs over simulated links
# (host_tests/qemu_manifest.py adds the tests). cryptolib comes from mbedtls
# (mpconfigboard.mk here), so aes_pure stays out as on rp2/esp32.
include("../microtun_manifest.py", cryptolib=True)
