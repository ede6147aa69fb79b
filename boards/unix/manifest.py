# A unix-port build with microtun frozen in:
#   cd micropython/ports/unix
#   make FROZEN_MANIFEST=/abs/path/to/microtun/boards/unix/manifest.py
include("$(PORT_DIR)/variants/manifest.py")
include("../microtun_manifest.py", cryptolib=True)
