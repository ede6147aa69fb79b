# microtun main.py: runs after boot.py on every reset (docs/FIRMWARE.md).
# Everything lives in microtun_fw (/lib/microtun_fw.mpy): safe mode, config
# check, network, tunnel, the app in app.py. Ctrl-C drops to the REPL.
try:
    import microtun_fw
except ImportError as e:
    print("microtun: cannot import microtun_fw (%s); flash the firmware: microtun flash" % e)
else:
    microtun_fw.main()
