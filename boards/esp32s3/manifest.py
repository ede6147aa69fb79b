# An ESP32_GENERIC_S3 firmware with microtun frozen in:
#   cd micropython/ports/esp32
#   make BOARD=ESP32_GENERIC_S3 FROZEN_MANIFEST=/abs/path/to/microtun/boards/esp32s3/manifest.py
# then flash it as usual and copy the rest with: microtun flash --frozen ...
include("$(PORT_DIR)/boards/manifest.py")
include("../microtun_manifest.py", cryptolib=True)
