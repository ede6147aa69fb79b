# The 32-bit unix build with nothing of microtun frozen in (tools/mpbuild.py
# unix32): what a board's stock firmware freezes that microtun relies on
# (asyncio), and no micropython-lib (mip, ssl wrappers), which the source
# tarball does not carry. Used to measure the .mpy deployment.
include("$(MPY_DIR)/extmod/asyncio")
