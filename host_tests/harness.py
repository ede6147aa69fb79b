"""Integration harness: see microtun_host.localnet (shared with `make demo`)."""
from microtun_host.localnet import (Net, Echo, Recorder, parse_result, free_ports,  # noqa: F401
                                    ROOT, LIB, PY, py_env, mp_env, micropython)
