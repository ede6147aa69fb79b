# microtun frozen into the qemu port's own MPS2_AN385 board, which has no
# cryptolib (tools/mpbuild.py qemu-pyaes): the AEAD runs on the pure-Python
# AES (microtun.aes_pure, frozen here and nowhere cryptolib is). Built for
# tools/bench_qemu.py's pure-Python AES figures: what a port without
# cryptolib gives (docs/FIGURES.md, "Speed on a Cortex-M3").
include("../microtun_manifest.py", cryptolib=False)
