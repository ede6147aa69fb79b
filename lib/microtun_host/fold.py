"""Fold the package's public constants into the code that uses them, for the
.mpy files a board loads (flash.compile_mpy), and leave out what MicroPython
ignores (`__slots__`).

A module-level `NAME = const(1)` costs a MicroPython board heap when NAME is
public: the compiler folds the value into the module's own code, but it
also stores NAME in the module's globals, so the name is a qstr (interned
in the heap when a .mpy loads, ~7 bytes of pool entry plus the string) and
a dict slot, and every `m.NAME` in another module is an attribute lookup.
Private names (`_NAME = const(1)`) cost none of it, but other modules, the
gateway and the tests need the wire constants under their public names.

So the source keeps them public, and the .mpy build folds them:
- in the module that defines NAME, NAME becomes _NAME (folded, no global);
- in every module that imports it (`import microtun.m as m` and `m.NAME`,
  `from microtun import m` and `m.NAME`, `from microtun.m import NAME`),
  each use becomes the value, and the name leaves the import statement.

What is folded: a top-level `NAME = const(<literal expression>)` whose value
is an int, bytes or str (public: no leading underscore), in any
lib/microtun module. Every .mpy of the package is compiled with the same
table, so the modules agree; on a board `microtun.messages.TYPE_INIT` no
longer exists (import the constant on the host, or read docs/PROTOCOL.md).
Frozen firmware is not folded: its qstrs are in flash already.

Lines are never added or removed: line numbers (`--lines`) stay true.
"""
import ast
import io
import threading
import tokenize
from pathlib import Path

LIB = Path(__file__).resolve().parent.parent / "microtun"
_PACKAGE = "microtun"

# CPython (3.11.7 here) keeps the AST constructor's recursion depth in
# interpreter-wide state, so two threads parsing at once can fail with
# "SystemError: AST constructor recursion depth mismatch" (python/cpython
# gh-106905): tools/bench_memory.build compiles its .mpy files on a thread
# pool, and every one is folded. The host's parses for a build go through here.
_PARSE = threading.Lock()


def parse(text, name="<source>"):
    """ast.parse, one thread at a time."""
    with _PARSE:
        return ast.parse(text, name)


class FoldError(Exception):
    """The fold would change what the code means: the source says where."""


def _value(node):
    """The value of a const() argument built from literals and arithmetic,
    or None if it is anything else."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, bytes, str):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Invert)):
        v = _value(node.operand)
        return (-v if isinstance(node.op, ast.USub) else ~v) if type(v) is int else None
    if isinstance(node, ast.BinOp):
        a, b = _value(node.left), _value(node.right)
        if type(a) is int and type(b) is int:
            ops = {ast.Add: a.__add__, ast.Sub: a.__sub__, ast.Mult: a.__mul__, ast.Pow: a.__pow__,
                   ast.LShift: a.__lshift__, ast.RShift: a.__rshift__, ast.BitOr: a.__or__,
                   ast.BitAnd: a.__and__, ast.FloorDiv: a.__floordiv__}
            f = ops.get(type(node.op))
            return f(b) if f else None
    return None


def public_consts(text, name="<source>"):
    """{NAME: value} of the module's top-level public `NAME = const(...)`."""
    got = {}
    for n in parse(text, name).body:
        if (isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)
                and not n.targets[0].id.startswith("_") and isinstance(n.value, ast.Call)
                and isinstance(n.value.func, ast.Name) and n.value.func.id == "const"
                and len(n.value.args) == 1):
            v = _value(n.value.args[0])
            if v is not None:
                got[n.targets[0].id] = v
    return got


def table(lib=LIB):
    """{module: {NAME: value}} for every module of the package."""
    return {p.stem: c for p in sorted(Path(lib).glob("*.py"))
            for c in [public_consts(p.read_text(), str(p))] if c}


def _literal(v):
    return "(%r)" % v if type(v) is int and v < 0 else repr(v)


def fold(text, module, consts, name="<source>"):
    """text with the constants of `consts` (table()) folded; module: the
    package module text is (its own constants become private), or None."""
    tree = parse(text, name)
    own = consts.get(module, {})
    aliases = {}        # local name -> module, for `m.NAME`
    dotted = set()      # modules imported as `import microtun.m`, for `microtun.m.NAME`
    direct = {}         # local name -> value, from `from microtun.m import NAME`
    imports = []        # (ImportFrom node, [alias nodes kept])
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                parts = a.name.split(".")
                if len(parts) == 2 and parts[0] == _PACKAGE and parts[1] in consts:
                    if a.asname:
                        aliases[a.asname] = parts[1]
                    else:
                        dotted.add(parts[1])        # microtun.m.NAME
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            if n.module == _PACKAGE:
                for a in n.names:
                    if a.name in consts:
                        aliases[a.asname or a.name] = a.name
            elif n.module.startswith(_PACKAGE + ".") and n.module.count(".") == 1:
                src = consts.get(n.module.split(".")[1], {})
                kept = [a for a in n.names if a.name not in src]
                for a in n.names:
                    if a.name in src:
                        direct[a.asname or a.name] = src[a.name]
                if len(kept) < len(n.names):
                    imports.append((n, kept))
    used = {n.value.id for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
            and n.attr in consts[aliases[n.value.id]]}
    aliases = {k: v for k, v in aliases.items() if k in used}
    # every name the module binds (an assignment, a parameter, `except as`),
    # with its first line, and every name it uses
    bound = {}
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            names.add(n.id)
            got = n.id if isinstance(n.ctx, ast.Store) else None
        else:
            got = n.arg if isinstance(n, ast.arg) else n.name if isinstance(n, ast.ExceptHandler) else None
        if got is not None and got not in bound:
            bound[got] = n.lineno
    for local in list(aliases) + list(direct) + ([_PACKAGE] if dotted else []):
        # a name bound twice (an alias reassigned, a parameter that shadows
        # it) would be folded where it means something else
        if local in bound:
            raise FoldError("%s:%d: %r is both an imported name and assigned; the constant fold "
                            "(microtun_host.fold) cannot tell them apart" % (name, bound[local], local))
    for c in own:
        if "_" + c in names:
            raise FoldError("%s: both %s and _%s are defined; the constant fold (microtun_host.fold) "
                            "would merge them" % (name, c, c))
    # __slots__ in a class body: CPython's memory saving (the gateway keeps
    # one Keypair per session); MicroPython ignores it, so on a board it is
    # only a tuple of names and one more qstr
    slots = [n for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for n in c.body
             if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)
             and n.targets[0].id == "__slots__"]
    if not (own or aliases or direct or dotted or slots):
        return text

    lines = text.splitlines(True)
    # whole statements first (the imports, __slots__), each to as many lines
    stmts = [(n, "from %s import %s" % (n.module, ", ".join(a.name + (" as " + a.asname if a.asname else "")
                                                            for a in kept)) if kept else "pass")
             for n, kept in imports] + [(n, "pass") for n in slots]
    for n, stmt in sorted(stmts, key=lambda x: -x[0].lineno):
        first = lines[n.lineno - 1]
        indent = first[:len(first) - len(first.lstrip())]
        end = lines[n.end_lineno - 1]
        tail = end[n.end_col_offset:]       # a comment, `; more`, the newline
        new = [indent + stmt + tail] + ["\n"] * (n.end_lineno - n.lineno)
        lines[n.lineno - 1:n.end_lineno] = new
    text = "".join(lines)

    toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    i = 0
    edits = []          # ((row, col) start, (row, col) end, replacement)
    while i < len(toks):
        t = toks[i]
        prev = toks[i - 1].string if i else ""
        if t.type == tokenize.NAME and prev != ".":
            if (t.string == _PACKAGE and dotted and i + 4 < len(toks) and toks[i + 1].string == "."
                    and toks[i + 2].string in dotted and toks[i + 3].string == "."
                    and toks[i + 4].string in consts[toks[i + 2].string]):
                edits.append((t.start, toks[i + 4].end, _literal(consts[toks[i + 2].string][toks[i + 4].string])))
                i += 5
                continue
            if (t.string in aliases and i + 2 < len(toks) and toks[i + 1].string == "."
                    and toks[i + 2].type == tokenize.NAME
                    and toks[i + 2].string in consts[aliases[t.string]]):
                edits.append((t.start, toks[i + 2].end, _literal(consts[aliases[t.string]][toks[i + 2].string])))
                i += 3
                continue
            if t.string in direct:
                edits.append((t.start, t.end, _literal(direct[t.string])))
            elif t.string in own:
                edits.append((t.start, t.end, "_" + t.string))
        i += 1
    lines = text.splitlines(True)
    for (r0, c0), (r1, c1), rep in reversed(edits):
        if r0 != r1:
            raise FoldError("%s:%d: a folded name spans lines" % (name, r0))
        line = lines[r0 - 1]
        lines[r0 - 1] = line[:c0] + rep + line[c1:]
    out = "".join(lines)
    parse(out, name)            # still Python
    return out
