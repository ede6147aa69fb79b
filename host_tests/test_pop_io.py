"""The PoP's fast paths (issue 15): the per-route hop relay
(microtun_host.hoprelay) against microtun.outer.relay byte for byte, the
batched socket I/O (microtun_host.mmsg: recvmmsg / sendmmsg) against what
recvfrom / sendto give, and PopReader over a real loopback socket with
batches on and off: the same forwarding, counted drops, send failures and
path challenges either way. In process, a few seconds."""
import logging
import os
import random
import socket
import sys

import pytest

from microtun import outer
from microtun_host import hoprelay, mmsg, pop
from microtun_host.config import Address

K1 = bytes(range(32))
K2 = bytes(range(32, 64))
HK1, HK2 = outer.HopKey(K1), outer.HopKey(K2)
LINUX = sys.platform.startswith("linux")


# --- hoprelay ------------------------------------------------------------------------

@pytest.mark.parametrize("ptype", [outer.TYPE_DATA, outer.TYPE_DATA_CE])
def test_hoprelay_is_outer_relay_byte_for_byte(ptype):
    rnd = random.Random(15)
    relay = hoprelay.relay_for(K1, 0xABCDEF, K2)
    for n in (0, 1, 16, 31, 32, 33, 48, 100, 1188, 2047, 2048, 4000, 65535):
        pkt = bytes(outer.seal(ptype, 100, HK1, rnd.randbytes(n)))
        want = outer.relay(pkt, HK1, 0xABCDEF, HK2)
        assert want is not None and relay(pkt) == want, n
        assert relay(bytearray(pkt)) == want            # any bytes-like packet
        bad = bytearray(pkt)
        bad[4 + rnd.randrange(8)] ^= 1 << rnd.randrange(8)           # the MAC
        assert relay(bytes(bad)) is None
        if n:
            bad = bytearray(pkt)
            bad[-1 if n > 32 else 12] ^= 1                          # an excerpt byte
            assert relay(bytes(bad)) is None
    assert relay(b"\x11\x00\x00\x64" + bytes(7)) is None            # shorter than the header
    assert relay(b"\x11\x00\x00\x64" + bytes(8 + 65536)) is None    # payload over PAYLOAD_MAX


# --- mmsg ---------------------------------------------------------------------------

needs_mmsg = pytest.mark.skipif(not LINUX or mmsg._calls() is None, reason="recvmmsg / sendmmsg: Linux only")


def _pair(family=socket.AF_INET, host="127.0.0.1"):
    socks = []
    for _ in range(3):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((host, 0))
        s.setblocking(False)
        socks.append(s)
    return socks


@needs_mmsg
@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_mmsg_receives_what_recvfrom_would(family, host):
    try:
        rx, a, b = _pair(family, host)
    except OSError:
        pytest.skip("no %s on this host" % host)
    m = mmsg.MmsgSocket.open(rx, n=8)
    try:
        assert m.recv() == []                            # nothing queued: EAGAIN is an empty batch
        big = os.urandom(65507 if family == socket.AF_INET else 65527)
        sent = [(os.urandom(i % 50), a if i % 3 else b) for i in range(20)] + [(big, a), (b"", b)]
        for data, s in sent:
            s.sendto(data, rx.getsockname())
        got = []
        while True:
            batch = m.recv()
            if not batch:
                break
            assert len(batch) <= 8
            got += batch
        assert [d for d, _ in got] == [d for d, _ in sent]           # whole (64 KiB slots), in order
        assert [addr for _, addr in got] == [s.getsockname() for _, s in sent]    # recvfrom's tuples
        assert m.syscalls == 1 + 3 + 1                   # EAGAIN, 22 datagrams in batches of 8, EAGAIN
    finally:
        m.close()
        for s in (rx, a, b):
            s.close()


@needs_mmsg
def test_mmsg_sends_in_order_and_returns_what_was_refused():
    tx, a, b = _pair()
    m = mmsg.MmsgSocket.open(tx, n=4)
    try:
        da, db = a.getsockname(), b.getsockname()
        items = [(b"p%d" % i, da if i % 2 else db) for i in range(10)]
        items[3] = (bytes(70000), da)                    # too long for UDP: EMSGSIZE
        items[6] = (b"v6 address", ("::1", 9, 0, 0))     # not this socket's family: sock.sendto refuses it
        items[8] = (b"bcast", ("255.255.255.255", 9))    # no SO_BROADCAST: EACCES
        assert m.send(items) == [3, 6, 8]
        for s, dest in ((a, da), (b, db)):
            want = [d for i, (d, to) in enumerate(items) if to == dest and i not in (3, 6, 8)]
            got = []
            while True:
                try:
                    got.append(s.recv(100))
                except BlockingIOError:
                    break
            assert got == want
        # more than one batch, one destination
        assert m.send([(b"%d" % i, da) for i in range(11)]) == []
        assert [a.recv(10) for _ in range(11)] == [b"%d" % i for i in range(11)]
    finally:
        m.close()
        for s in (tx, a, b):
            s.close()


def test_mmsg_address_forms():
    assert mmsg._decode(mmsg._encode(("10.1.2.3", 4567), socket.AF_INET)) == ("10.1.2.3", 4567)
    v6 = ("2001:db8::7", 443, 0, 0)
    assert mmsg._decode(mmsg._encode(v6, socket.AF_INET6)) == v6
    assert mmsg._decode(mmsg._encode(("::ffff:10.0.0.1", 5, 0, 0), socket.AF_INET6)) == ("::ffff:10.0.0.1", 5, 0, 0)
    for bad in (("not an address", 1), ("10.0.0.1", 70000), ("10.0.0.1",), None):
        assert mmsg._encode(bad, socket.AF_INET) is None                # left to sock.sendto


# --- PopReader, batched and not ---------------------------------------------------------

def _reader(batch, sink_addr, specs=None):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    specs = specs or [pop.RouteSpec(100, K1, Address(4, *sink_addr), 0, 200, K2),
                      pop.RouteSpec(201, K2, None, 100, 101, K1),
                      pop.RouteSpec(300, K1, Address(4, "255.255.255.255", 9), 0, 301, K2)]     # every send refused
    log = logging.getLogger("test_pop_io")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    f = pop.Forwarder(pop.build_table(specs), log)
    return pop.PopReader(f, sock, log, None, batch=batch), sock


def _drain(s):
    out = []
    while True:
        try:
            out.append(s.recvfrom(70000))
        except BlockingIOError:
            return out


@pytest.mark.parametrize("batch", [True, False], ids=["recvmmsg", "recvfrom"])
def test_pop_reader_same_behaviour_batched_or_not(batch):
    if batch and (not LINUX or mmsg._calls() is None):
        pytest.skip("recvmmsg / sendmmsg: Linux only")
    dev, dev2, sink = _pair()
    r, sock = _reader(batch, sink.getsockname())
    try:
        assert (r.mm is not None) == batch
        me = sock.getsockname()
        rnd = random.Random(7)
        payloads = [rnd.randbytes(rnd.randrange(0, 1300)) for _ in range(300)]
        for i, p in enumerate(payloads):               # more than a batch and more than READ_BURST
            dev.sendto(bytes(outer.seal(outer.TYPE_DATA, 100, HK1, p)), me)
            if i % 50 == 0:
                dev.sendto(bytes(outer.seal(outer.TYPE_DATA, 100, HK2, p)), me)     # bad MAC
                dev.sendto(b"\x11", me)                                           # short
        while r.fwd.rx < 312:
            r.readable()
        got = _drain(sink)
        assert [outer.parse(d) for d, _ in got] == [(outer.TYPE_DATA, 200)] * 300
        assert [d[12:] for d, _ in got] == payloads                              # in order, untouched
        assert all(outer.verify(HK2, d) for d, _ in got)
        assert {a for _, a in got} == {me}
        f = r.fwd
        assert f.learned == {100: dev.getsockname()}
        assert (f.forwarded, f.drops["bad_mac"], f.drops["short"]) == (300, 6, 6)
        # downlink to the learned device address, and a challenge to a new source
        sink.sendto(bytes(outer.seal(outer.TYPE_DATA, 201, HK2, b"down")), me)
        dev2.sendto(bytes(outer.seal(outer.TYPE_DATA, 100, HK1, b"moved?")), me)
        r.readable()
        assert [d[12:] for d, _ in _drain(dev)] == [b"down"]
        chal = _drain(dev2)
        assert [d[0] for d, _ in chal] == [outer.BYTE0_PATH_CHALLENGE] and f.challenges == 1
        assert [d[12:] for d, _ in _drain(sink)] == [b"moved?"]     # forwarded; the address has not moved
        # a next hop the socket refuses: each packet counted as a send error, not forwarded
        for _ in range(5):
            dev.sendto(bytes(outer.seal(outer.TYPE_DATA, 300, HK1, b"x" * 40)), me)
        r.readable()
        s = f.stats()
        assert s["drops"]["send_error"] == 5 and s["forwarded"] == 302
        assert s["rx"] == s["forwarded"] + s["probes"] + s["keepalives"] + s["path_responses"] + s["dropped"]
    finally:
        r.close()
        for s in (sock, dev, dev2, sink):
            s.close()


@needs_mmsg
def test_pop_reader_batch_send_bug_is_counted_not_lost():
    dev, other, sink = _pair()
    other.close()
    r, sock = _reader(True, sink.getsockname())
    try:
        def broken(items):
            raise RuntimeError("a bug in the batch sender")
        r.mm.send = broken
        for _ in range(3):
            dev.sendto(bytes(outer.seal(outer.TYPE_DATA, 100, HK1, b"y" * 50)), sock.getsockname())
        r.readable()
        s = r.fwd.stats()
        assert (s["rx"], s["forwarded"], s["drops"]["send_error"]) == (3, 0, 3)
        assert s["rx"] == s["forwarded"] + s["dropped"]
    finally:
        r.close()
        for s in (sock, dev, sink):
            s.close()


@pytest.mark.parametrize("batch", [True, False], ids=["recvmmsg", "recvfrom"])
def test_segment_packets_leave_after_the_packet_that_made_them(batch):
    """A LOOPS ingress (FEC, groups of 2): each group's parity leaves right
    after the packet that completed it, in the batch or alone; a refused one
    is a send error and takes nothing off `forwarded`."""
    if batch and (not LINUX or mmsg._calls() is None):
        pytest.skip("recvmmsg / sendmmsg: Linux only")
    from microtun_host.segment import SegConfig
    dev, _, sink = _pair()
    fec = SegConfig("fec", fec_k=2, fec_m=1)
    r, sock = _reader(batch, None, [pop.RouteSpec(100, K1, Address(4, *sink.getsockname()), 0, 200, K2, seg_out=fec)])
    try:
        for i in range(6):
            dev.sendto(bytes(outer.seal(outer.TYPE_DATA, 100, HK1, bytes((i,)) * 40)), sock.getsockname())
        while r.fwd.rx < 6:
            r.readable()
        kinds = [outer.parse(d)[0] for d, _ in _drain(sink)]
        D, P = outer.TYPE_SEG_DATA, outer.TYPE_SEG_REPAIR
        assert kinds[:9] == [D, D, P, D, D, P, D, D, P], kinds       # (a ping may follow: the timer's)
        assert r.fwd.forwarded == 6
        if batch:
            def refuse_parities(items):
                return [i for i, (d, _) in enumerate(items) if outer.parse(d)[0] == P]
            r.mm.send = refuse_parities
            for i in range(2):
                dev.sendto(bytes(outer.seal(outer.TYPE_DATA, 100, HK1, b"z" * 40)), sock.getsockname())
            while r.fwd.rx < 8:
                r.readable()
            s = r.fwd.stats()
            assert s["forwarded"] == 8 and s["drops"]["send_error"] == 1
    finally:
        r.close()
        for s in (sock, dev, sink):
            s.close()
