# A RPI_PICO_W firmware with microtun frozen in:
#   cd micropython/ports/rp2
#   make BOARD=RPI_PICO_W FROZEN_MANIFEST=/abs/path/to/microtun/boards/rpi_pico_w/manifest.py
# then flash it as usual and copy the rest with: microtun flash --frozen ...
include("$(BOARD_DIR)/manifest.py")     # the W board's own: port manifest + networking bundle
include("../microtun_manifest.py", cryptolib=True)
