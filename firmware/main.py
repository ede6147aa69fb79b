# microtun main.py: runs after boot.py on every reset (docs/FIRMWARE.md).
# The boot loader (microtun_slot, docs/UPDATE.md) picks the code set, the
# committed one or a new release on trial, and imports microtun_fw from it:
# safe mode, config check, network, tunnel, the app in app.py. Ctrl-C drops
# to the REPL. Kept short: its bytecode stays in RAM while the board runs.
# A board never updated over the air has no /ota: nothing to pick, and the
# loader is not even loaded (a loaded module's names stay in the heap).
import os
go = True
try:
    os.stat("ota")
except OSError:                      # no /ota: the flashed files
    pass
else:
    try:
        import microtun_slot
        go = microtun_slot.start()
        del microtun_slot            # the loader keeps itself in sys.modules only while a release is on trial
    except Exception as e:           # no loader (flashed before updates), or a broken one
        print("microtun: boot loader: %r" % (e,))
        go = True
if go:
    import microtun_fw
    microtun_fw.main()
