# The qemu *test* image (tools/mpbuild.py qemu-test): the qemu MPS2_AN385
# board's firmware (boards/qemu/, cryptolib via mbedtls) with the whole
# portable package frozen in (the device's modules and the gateway-side ones
# the simulated networks need: responder, noise, outer; aes_pure for its own
# vectors), the test modules marked `QEMU = True`, their helpers from
# host_tests/ and the runner (mprun.py). The board has no filesystem, so
# everything a test imports must be frozen; host_tests/conftest.py runs each
# test module as `import mprun; mprun.main(["test_x"])` over the raw REPL.
# The device image itself is boards/qemu/manifest.py (`make qemu`).
import ast
import os
import re

package("microtun", base_path="../lib")

_HERE = os.path.abspath(".")   # the build runs a manifest from its own directory
_tests = sorted(f[:-3] for f in os.listdir(_HERE)
                if f.startswith("test_") and f.endswith(".py")
                and re.search(r"^QEMU = True\b", open(os.path.join(_HERE, f)).read(), re.M))
_todo = ["mprun"] + _tests
_seen = set()
while _todo:
    _m = _todo.pop()
    if _m in _seen or not os.path.isfile(os.path.join(_HERE, _m + ".py")):
        continue
    _seen.add(_m)
    for _node in ast.walk(ast.parse(open(os.path.join(_HERE, _m + ".py")).read())):
        if isinstance(_node, ast.Import):
            _todo.extend(a.name for a in _node.names)
        elif isinstance(_node, ast.ImportFrom) and _node.module and not _node.level:
            _todo.append(_node.module)
for _m in sorted(_seen):
    module(_m + ".py")
