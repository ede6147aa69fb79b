# microtun's qemu board (tools/mpbuild.py qemu, `make qemu`): MicroPython's
# qemu port, board MPS2_AN385 (Cortex-M3, the machine `qemu-system-arm
# -machine mps2-an385` emulates), plus `cryptolib` through mbedtls's AES, as
# the rp2 and esp32 ports have it. The qemu port builds no cryptolib by
# itself; this adds only what cryptolib.aes (ECB, CBC) needs: mbedtls's
# aes.c and platform_util.c, and sha256.c, because with MICROPY_SSL_MBEDTLS
# hashlib.sha256 is mbedtls's too (as on rp2/esp32); configured by
# mbedtls_config_port.h here.
# Passed to the port's Makefile as BOARD_DIR=<this directory> BOARD=MPS2_AN385.
include $(TOP)/ports/qemu/boards/MPS2_AN385/mpconfigboard.mk

SRC_C += lib/mbedtls/library/aes.c lib/mbedtls/library/platform_util.c lib/mbedtls/library/sha256.c
CFLAGS += -DMICROPY_PY_CRYPTOLIB=1 -DMICROPY_SSL_MBEDTLS=1 -I$(TOP)/lib/mbedtls/include
CFLAGS += -DMBEDTLS_CONFIG_FILE='"$(abspath $(BOARD_DIR))/mbedtls_config_port.h"'
