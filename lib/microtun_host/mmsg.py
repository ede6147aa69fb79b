"""Batched UDP I/O for the PoP on Linux: recvmmsg(2) and sendmmsg(2)
through ctypes, one system call for up to BATCH datagrams each way.

    b = MmsgSocket.open(sock)        # None where the calls are missing: use recvfrom / sendto
    got = b.recv()                   # [(bytes, address)], [] when nothing is queued; OSError
    failed = b.send([(pkt, dest), ...])  # indexes of the datagrams the socket refused

What it saves per datagram is not the system call's entry (on loopback the
kernel's own per-packet path dominates) but what CPython's socket module
does around each one: sendto() parses its address tuple per call, and
recvfrom() builds a new one. Here the kernel's sockaddr bytes are mapped
to an address tuple through a small cache on receive, and each destination
tuple is packed once into a sockaddr on send (measured: docs/OUTER.md,
"PoP per-packet cost"). Addresses look exactly as recvfrom() gives them
(host_tests/test_mmsg.py compares both on IPv4 and IPv6).

Buffers: BATCH slots of 64 KiB each way (any UDP datagram fits, none is
truncated), in anonymous mappings: the kernel backs only the pages the
datagrams touch. One MmsgSocket per socket, used from one thread.
"""
import ctypes
import errno
import mmap
import os
import socket
import sys

BATCH = 64                      # datagrams per system call
SLOT = 65536                    # bytes per datagram slot (a UDP payload is at most 65,527)
_NAME = 28                      # sizeof(struct sockaddr_in6) >= sockaddr_in's 16
_CACHE_MAX = 4096               # address cache entries each way (cleared when full)
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


_MMSG_SIZE = ctypes.sizeof(_Mmsghdr)
_libc = None


def _calls():
    """(recvmmsg, sendmmsg) from the C library, or None (not Linux, no such calls)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        r, s = _libc.recvmmsg, _libc.sendmmsg
    except (OSError, AttributeError):
        return None
    r.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    r.restype = ctypes.c_int
    s.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    s.restype = ctypes.c_int
    return r, s


def _word(offset, size):
    """Index of a field at byte offset in a memoryview cast to items of size."""
    if offset % size:
        raise ValueError("unaligned field")
    return offset // size


class _Ring:
    """n mmsghdr entries, each with one iovec onto its own SLOT-byte slot
    and its own sockaddr buffer."""

    def __init__(self, n):
        self.n = n
        self.data = mmap.mmap(-1, n * SLOT)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.data))
        self.names = mmap.mmap(-1, n * _NAME)     # slicing an mmap gives bytes: one copy, no view
        names = ctypes.addressof(ctypes.c_char.from_buffer(self.names))
        self.iov = (_Iovec * n)()
        self.hdrs = (_Mmsghdr * n)()
        iov = ctypes.addressof(self.iov)
        for i in range(n):
            self.iov[i].base = base + i * SLOT
            self.iov[i].len = SLOT
            h = self.hdrs[i].hdr
            h.name = names + i * _NAME
            h.namelen = _NAME
            h.iov = iov + i * ctypes.sizeof(_Iovec)
            h.iovlen = 1
        self.ptr = ctypes.addressof(self.hdrs)
        self.template = bytes(self.hdrs)     # namelen and flags back to these before each recvmmsg
        raw = memoryview(self.hdrs).cast("B")
        self.raw = raw
        self.u32 = raw.cast("I")
        ptr = "Q" if ctypes.sizeof(ctypes.c_void_p) == 8 else "I"
        self.ptrs = raw.cast(ptr)
        self.iov_sizes = memoryview(self.iov).cast("B").cast("Q" if ctypes.sizeof(ctypes.c_size_t) == 8 else "I")
        m = ctypes.sizeof(_Mmsghdr)
        p = ctypes.sizeof(ctypes.c_void_p)
        z = ctypes.sizeof(ctypes.c_size_t)
        self.stride32 = _word(m, 4)
        self.len32 = _word(_Mmsghdr.len.offset, 4)
        self.namelen32 = _word(_Msghdr.namelen.offset, 4)
        self.stride_p = _word(m, p)
        self.name_p = _word(_Msghdr.name.offset, p)
        self.iov_stride = _word(ctypes.sizeof(_Iovec), z)
        self.iov_len = _word(_Iovec.len.offset, z)

    def close(self):
        for v in (self.ptrs, self.u32, self.raw, self.iov_sizes):
            v.release()
        for m in (self.data, self.names):
            try:
                m.close()
            except BufferError:         # a ctypes view still exported: the mapping goes with the object
                pass


def _decode(raw):
    """A kernel sockaddr (bytes) as the address tuple recvfrom() gives."""
    fam = int.from_bytes(raw[0:2], sys.byteorder)
    port = int.from_bytes(raw[2:4], "big")
    if fam == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if fam == socket.AF_INET6:
        host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        scope = int.from_bytes(raw[24:28], sys.byteorder)
        if scope:
            try:
                host += "%" + socket.if_indextoname(scope)
            except OSError:
                host += "%%%d" % scope
        return host, port, int.from_bytes(raw[4:8], "big"), scope
    raise ValueError("address family %d" % fam)


def _encode(addr, family):
    """An address tuple as sockaddr bytes for a socket of family, or None
    (then the datagram goes through sock.sendto, which knows every form)."""
    try:
        if family == socket.AF_INET:
            host, port = addr
            return (socket.AF_INET.to_bytes(2, sys.byteorder) + port.to_bytes(2, "big") +
                    socket.inet_pton(socket.AF_INET, host) + bytes(8))
        if family == socket.AF_INET6:
            host, port = addr[0], addr[1]
            flow = addr[2] if len(addr) > 2 else 0
            scope = addr[3] if len(addr) > 3 else 0
            if "%" in host:
                return None
            return (socket.AF_INET6.to_bytes(2, sys.byteorder) + port.to_bytes(2, "big") + flow.to_bytes(4, "big") +
                    socket.inet_pton(socket.AF_INET6, host) + scope.to_bytes(4, sys.byteorder))
    except (OSError, ValueError, TypeError, OverflowError, AttributeError):
        return None
    return None


class MmsgSocket:
    """recvmmsg / sendmmsg on one non-blocking UDP socket (see the module docstring)."""

    @classmethod
    def open(cls, sock, n=BATCH):
        """An MmsgSocket for sock, or None where the calls are missing (not
        Linux, an unknown pointer size, no recvmmsg in the C library)."""
        calls = _calls()
        if calls is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        try:
            return cls(sock, n, calls)
        except (ValueError, OSError, TypeError):
            return None

    def __init__(self, sock, n, calls):
        self.sock = sock
        self.fd = sock.fileno()
        self.n = n
        self._recvmmsg, self._sendmmsg = calls
        self.rx = _Ring(n)
        self.tx = _Ring(n)
        self._names = {}            # sockaddr bytes -> address tuple (received)
        self._dests = {}            # address tuple -> (ctypes sockaddr buffer, its address, length), or None
        self.syscalls = 0           # recvmmsg + sendmmsg calls made (tests, stats)

    def close(self):
        self.rx.close()
        self.tx.close()

    def recv(self):
        """Every datagram queued, up to n: [(bytes, address tuple)]; [] when
        none is (EAGAIN). OSError for any other error (an ICMP error for an
        earlier send is reported this way: the next call goes on)."""
        rx = self.rx
        rx.raw[:] = rx.template
        self.syscalls += 1
        got = self._recvmmsg(self.fd, rx.ptr, self.n, _MSG_DONTWAIT, None)
        if got <= 0:
            if got == 0:
                return []
            err = ctypes.get_errno()
            if err in _RETRY:
                return []
            raise OSError(err, os.strerror(err))
        u32, data, names, cache = rx.u32, rx.data, rx.names, self._names
        s32, ln, nl = rx.stride32, rx.len32, rx.namelen32
        out = []
        for i in range(got):
            j = i * s32
            off = i * SLOT
            n = i * _NAME
            key = names[n:n + u32[j + nl]]
            addr = cache.get(key)
            if addr is None:
                if len(cache) >= _CACHE_MAX:
                    cache.clear()
                addr = cache[key] = _decode(key)
            out.append((data[off:off + u32[j + ln]], addr))
        return out

    def _dest(self, addr):
        """(sockaddr buffer, its address, length) for addr, or None when it
        cannot be packed here (sock.sendto then takes it). Not cached as None:
        an address of an unexpected form is rare, and must not fill the cache."""
        raw = _encode(addr, self.sock.family)
        if raw is None:
            return None
        if len(self._dests) >= _CACHE_MAX:
            self._dests.clear()
        buf = ctypes.create_string_buffer(raw, len(raw))
        d = self._dests[addr] = (buf, ctypes.addressof(buf), len(raw))
        return d

    def send(self, items):
        """Send [(datagram, destination)] in order, up to n per call. Returns
        the indexes of the datagrams the socket refused (buffer full,
        unreachable, too long), each tried once; [] normally."""
        failed = []
        tx = self.tx
        ptrs, u32, sizes, data, dests = tx.ptrs, tx.u32, tx.iov_sizes, tx.data, self._dests
        sp, np_, s32, nl, si, sl = tx.stride_p, tx.name_p, tx.stride32, tx.namelen32, tx.iov_stride, tx.iov_len
        keep = []                   # the sockaddr buffers in use (a cache clear must not free them mid-call)
        start = 0
        total = len(items)
        while start < total:
            j = 0                   # entries filled
            idx = []                # item index of each entry
            i = start
            while i < total and j < self.n:
                pkt, addr = items[i]
                d = dests.get(addr)
                if d is None:
                    d = self._dest(addr)
                size = len(pkt)
                if d is None or size > SLOT:
                    if j:
                        break       # send what is queued first: order is kept
                    try:
                        self.sock.sendto(pkt, addr)
                    except (OSError, TypeError, ValueError):
                        failed.append(i)
                    i += 1
                    start = i
                    continue
                keep.append(d[0])
                off = j * SLOT
                data[off:off + size] = pkt
                sizes[j * si + sl] = size
                ptrs[j * sp + np_] = d[1]
                u32[j * s32 + nl] = d[2]
                idx.append(i)
                j += 1
                i += 1
            k = 0
            while k < j:
                self.syscalls += 1
                r = self._sendmmsg(self.fd, tx.ptr + k * _MMSG_SIZE, j - k, _MSG_DONTWAIT)
                if r <= 0:
                    failed.append(idx[k])       # the first one was refused: count it, go on after it
                    k += 1
                else:
                    k += r
            start = i
        return failed
