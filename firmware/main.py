# microtun main.py: runs after boot.py on every reset (docs/FIRMWARE.md).
# The boot loader (microtun_slot, docs/UPDATE.md) picks the code set, the
# committed one or a new release on trial, and imports microtun_fw from it:
# safe mode, config check, network, tunnel, the app in app.py. Ctrl-C drops
# to the REPL. Kept short: its bytecode stays in RAM while the board runs.
try:
    import microtun_slot
    go = microtun_slot.start()
except Exception as e:               # no loader (flashed before updates), or a broken one
    print("microtun: boot loader: %r" % (e,))
    microtun_slot = None
    go = True
if go:
    del microtun_slot
    import microtun_fw
    microtun_fw.main()
