"""The constant fold of the .mpy build (microtun_host.fold, used by
flash.compile_mpy): the package's public wire constants are folded into the
code that uses them, so that a board's heap holds neither their names
(qstrs) nor their globals. What the folded modules do on a board is
covered by the heap scenarios and the firmware trials, which load the
.mpy files compile_mpy makes (test_device_heap.py, test_firmware.py)."""
import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))

from microtun_host import flash, fold    # noqa: E402

TABLE = {"defs": {"TYPE_A": 1, "NEG": -2, "LABEL": b"ab", "KIND": "k"}}


def test_public_consts_reads_literals_and_arithmetic_only():
    text = ("A = const(1)\nB = const(2**64 - 2**13 - 1)\nC = const(b'x')\nD = const('s')\n"
            "E = const(-(1 << 4))\n_F = const(3)\nG = 4\nH = const(len('x'))\nI = [const(5)]\n")
    assert fold.public_consts(text) == {"A": 1, "B": 2**64 - 2**13 - 1, "C": b"x", "D": "s", "E": -16}


def test_table_values_are_what_cpython_gives_the_modules():
    t = fold.table()
    assert "messages" in t and "hop" in t
    for mod, consts in t.items():
        m = importlib.import_module("microtun." + mod)
        for name, v in consts.items():
            assert getattr(m, name) == v and type(getattr(m, name)) is type(v), (mod, name)


def test_defining_module_makes_its_constants_private():
    src = "TYPE_A = const(1)\nKIND = const('k')\n\ndef f(x):\n    return x == TYPE_A, x.TYPE_A, KIND\n"
    out = fold.fold(src, "defs", TABLE)
    assert out == "_TYPE_A = const(1)\n_KIND = const('k')\n\ndef f(x):\n    return x == _TYPE_A, x.TYPE_A, _KIND\n"


def test_importers_get_the_values_and_lose_the_names():
    src = ("import microtun.defs as d\n"
           "from microtun.defs import NEG, other as o\n"
           "from microtun.defs import (LABEL,\n"
           "                           KIND)  # the rest\n"
           "def f(t):\n"
           "    from microtun.defs import TYPE_A\n"
           "    return t == d.TYPE_A, d.other, NEG, LABEL + KIND.encode(), TYPE_A\n")
    out = fold.fold(src, "user", TABLE)
    assert out.splitlines() == [
        "import microtun.defs as d",
        "from microtun.defs import other as o",
        "pass  # the rest",
        "",
        "def f(t):",
        "    pass",
        "    return t == 1, d.other, (-2), b'ab' + 'k'.encode(), 1"]
    ast.parse(out)


def test_a_dotted_import_is_folded_too():
    # an app's `import microtun.endpoint` and `microtun.endpoint.DATA`: on a
    # .mpy board that name is not there, so the use must not be left as it is
    src = "import microtun.defs\nimport microtun\nx = (microtun.defs.TYPE_A, microtun.defs.other, microtun.x)\n"
    assert fold.fold(src, "user", TABLE) == (
        "import microtun.defs\nimport microtun\nx = (1, microtun.defs.other, microtun.x)\n")


def test_module_without_folded_names_is_returned_as_is():
    src = "import microtun.defs as d\nx = d.other\n"
    assert fold.fold(src, "user", TABLE) is src


@pytest.mark.parametrize("src", [
    "import microtun.defs as d\ndef f(d):\n    return d.TYPE_A\n",
    "from microtun.defs import TYPE_A\nfor TYPE_A in range(3):\n    pass\n",
    "import microtun.defs as d\ntry:\n    x = d.TYPE_A\nexcept ValueError as d:\n    pass\n",
])
def test_a_name_bound_twice_is_refused(src):
    with pytest.raises(fold.FoldError, match="cannot tell them apart"):
        fold.fold(src, "user", TABLE)


def test_private_twin_is_refused():
    with pytest.raises(fold.FoldError, match="both TYPE_A and _TYPE_A"):
        fold.fold("TYPE_A = const(1)\n_TYPE_A = 2\n", "defs", TABLE)


def test_every_shipped_module_folds_to_the_same_lines_and_no_public_constant_is_left():
    t = fold.table()
    mods = flash.device_modules()
    for m in mods:
        src = (flash.LIB / (m + ".py")).read_text()
        out = fold.fold(src, m, t, m)
        assert len(out.splitlines()) == len(src.splitlines()), m
        tree = ast.parse(out)
        for n in tree.body:       # its own constants: private now
            if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name):
                assert n.targets[0].id not in t.get(m, {}), (m, n.targets[0].id)
        for n in ast.walk(tree):  # nothing imported by the name of a folded constant
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("microtun."):
                left = {a.name for a in n.names} & set(t.get(n.module.split(".")[1], {}))
                assert not left, (m, left)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in ("m", "hop"):
                assert n.attr not in t.get({"m": "messages"}.get(n.value.id, n.value.id), {}), (m, n.attr)


def test_compile_mpy_refuses_what_it_cannot_fold(tmp_path):
    src = tmp_path / "bad.py"
    src.write_text("import microtun.messages as m\ndef f(m):\n    return m.TYPE_INIT\n")
    with pytest.raises(flash.FlashError, match="cannot compile .*bad.py.*'m' is both"):
        flash.compile_mpy(src, tmp_path / "bad.mpy", "bad.py")


def test_slots_leave_the_class_body_and_nothing_else_changes():
    src = ("class K:\n    __slots__ = ('a',\n                 'b')  # CPython\n    x = 1\n\n"
           "def f():\n    __slots__ = 3\n    return __slots__\n")
    out = fold.fold(src, None, {})
    assert out == "class K:\n    pass  # CPython\n\n    x = 1\n\ndef f():\n    __slots__ = 3\n    return __slots__\n"


def test_an_app_mpy_cross_refuses_is_named_with_its_line(tmp_path):
    # valid for CPython's parser, refused by MicroPython's compiler
    # (MicroPython has no `nonlocal` at module level either, but this is
    # one both agree on being wrong only at compile time)
    src = tmp_path / "my_app.py"
    src.write_text("x = 1\n\n\ndef f():\n    nonlocal x\n")
    with pytest.raises(flash.FlashError) as e:
        flash.build_app(src, flash.boards()["unix"], tmp_path / "out")
    assert "my_app.py" in str(e.value) and "line 5" in str(e.value), e.value
    assert "microtun-mpy-" not in str(e.value)      # the user's file, not our temporary copy


def test_an_app_with_a_syntax_error_is_refused_before_the_board(tmp_path):
    src = tmp_path / "my_app.py"
    src.write_text("x = 1\ndef f(:\n    pass\n")
    with pytest.raises(flash.FlashError, match=r"cannot compile .*my_app.py: .*line 2"):
        flash.build_app(src, flash.boards()["unix"], tmp_path / "out")


class _Finalised:
    def __del__(self):
        sum(range(50))


def _parse_amid_garbage(text):
    # garbage in a cycle with finalisers: the collector runs Python code in
    # the middle of a parse, and another thread can take the interpreter there
    junk = [_Finalised() for _ in range(50)]
    junk.append(junk)
    junk = None
    try:
        fold.parse(text, "endpoint.py")
        return 0
    except SystemError:
        return 1


def test_parse_is_safe_on_a_thread_pool():
    # tools/bench_memory.build folds each .mpy on a thread pool; on CPython
    # 3.11 ast.parse in two threads at once can raise "SystemError: AST
    # constructor recursion depth mismatch" (python/cpython gh-106905; make
    # test hit it once). With ast.parse here instead of fold.parse, about
    # 40 of these 300 parses fail that way on 3.11.7.
    from concurrent.futures import ThreadPoolExecutor
    text = (ROOT / "lib" / "microtun" / "endpoint.py").read_text()
    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(_parse_amid_garbage, [text] * 300)) == 0
