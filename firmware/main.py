# microtun main.py: runs after boot.py on every reset (docs/FIRMWARE.md).
# microtun_slot (the boot loader, docs/UPDATE.md) first picks the code set:
# the committed one, or a new release on trial. Everything else lives in
# microtun_fw: safe mode, config check, network, tunnel, the app in app.py.
# Ctrl-C drops to the REPL.
try:
    import microtun_slot
    microtun_slot.boot()
    del microtun_slot
except Exception as e:               # a missing or broken loader never stops the board
    print("microtun: boot loader: %r; running the flashed files" % e)
try:
    import microtun_fw
except Exception as e:
    print("microtun: cannot import microtun_fw (%r); flash the firmware: microtun flash" % e)
    import sys
    s = sys.modules.get("microtun_slot")
    if s is not None and s.failed("cannot import microtun_fw: %r" % e):
        s.reset()                    # a release on trial: rolled back, the next boot runs the last good set
else:
    microtun_fw.main()
