// mbedtls configuration for microtun's qemu board (boards/qemu/mpconfigboard.mk):
// only the AES block cipher that MicroPython's cryptolib.aes uses (ECB and
// CBC modes, tables in flash) and the SHA-256 that hashlib.sha256 uses when
// MICROPY_SSL_MBEDTLS is set; the options as extmod/mbedtls/mbedtls_config_common.h
// sets them for the rp2 and esp32 ports.
#ifndef MICROTUN_QEMU_MBEDTLS_CONFIG_H
#define MICROTUN_QEMU_MBEDTLS_CONFIG_H

#define MBEDTLS_AES_C
#define MBEDTLS_AES_ROM_TABLES
#define MBEDTLS_CIPHER_MODE_CBC
#define MBEDTLS_SHA256_C
#define MBEDTLS_SHA256_SMALLER

#endif
