"""The last few log lines in RAM, for the ops channel's `logs` (docs/OPS.md):
a device whose config says "ops": true logs through one of these, so an
operator can tail it through the tunnel without stopping anything. Bounded
in bytes; the oldest lines go first.

    log = LogRing(print_log, max_bytes=2048)
    log("info", "path a is up")              # passes the line on, keeps a copy
    nxt, first, text = log.since(0, 1000)     # lines after sequence 0, at most 1000 bytes
"""


class LogRing:
    def __init__(self, log, max_bytes=2048):
        self.log = log
        self.max = max_bytes
        self.lines = []
        self.size = 0
        self.seq = 0                 # sequence number of the newest line (the first is 1)

    def __call__(self, level, msg):
        self.log(level, msg)
        self.add("%s %s" % (level, msg))

    def exception(self, what, e):
        """The firmware's Log.exception (traceback to the console and the log file)."""
        self.log.exception(what, e)

    def add(self, line):
        self.seq += 1
        line = line[:self.max // 2]
        self.lines.append(line)
        self.size += len(line) + 1
        while self.size > self.max and len(self.lines) > 1:
            self.size -= len(self.lines.pop(0)) + 1

    def since(self, seq, limit):
        """(next, first, text): the lines numbered above seq, at most limit
        bytes of them (newline-terminated); next is the number to ask from
        again, first the oldest line still kept (above seq+1: lines were lost)."""
        first = self.seq - len(self.lines) + 1
        i = seq - first + 1
        if i < 0:
            i = 0
        out = []
        n = 0
        nxt = seq if seq >= first - 1 else first - 1
        while i < len(self.lines):
            s = self.lines[i]
            if out and n + len(s) + 1 > limit:
                break
            out.append(s)
            n += len(s) + 1
            i += 1
            nxt = first + i - 1
        text = ("\n".join(out) + "\n").encode() if out else b""
        return nxt, first, text[:limit]
