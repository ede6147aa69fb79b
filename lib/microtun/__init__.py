"""microtun — the portable package (flashed to devices, also used on CPython).

Everything here except the `driver` modules is sans-I/O: no sockets, no
clocks, no board access. See docs/ARCHITECTURE.md.
"""
__version__ = "0.1.0"
