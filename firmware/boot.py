# microtun boot.py: runs first on every reset, and on mpremote's soft reset
# too. Keep it short and never blocking: main.py does the work
# (docs/FIRMWARE.md).
import gc
gc.collect()
