"""microtun.paths' state table and probe pacing as text (docs/PATHS.md,
"States"), printed from the tables the device code uses.

On the host, not in microtun.paths: a device never prints it, and as a
function of that module it cost a board 400 B of heap (the .mpy's import,
32-bit unix port) and two qstrs.

    python -m microtun_host.pathtable
"""
from microtun import paths


def print_table():
    """The transitions, one a line, then how often each state probes."""
    lines = ["state    event   -> state"]
    for (s, e), t in sorted(paths.TRANSITIONS.items()):
        lines.append("%-8s %-7s -> %s" % (s, e, t))
    pace = []
    for s in ("new", "up", "suspect", "down"):
        pace.append("%s %d active / %d idle" % (s, paths.PROBE_ACTIVE_MS[s], paths.PROBE_IDLE_MS[s]))
    lines.append("")
    lines.append("probe every (ms): " + ", ".join(pace))
    return "\n".join(lines)


if __name__ == "__main__":
    print(print_table())
