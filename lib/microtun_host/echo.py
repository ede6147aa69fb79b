"""`microtun echo HOST:PORT`: a UDP echo service for a gateway channel
(README step 3; the service tools/device_run.py expects on channel 1).
Every datagram goes back to where it came from; one line per datagram on
stdout (up to --show of them, then a count every 100).
"""
import socket
import sys

from microtun_host.config import parse_address


def main(addr, show=20):
    a = parse_address(addr)
    if a is None:
        print("microtun echo: %r: expected \"127.0.0.1:5000\" or \"[::1]:5000\" (numeric)" % addr, file=sys.stderr)
        return 2
    s = socket.socket(socket.AF_INET6 if a.family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(a.sockaddr)
    except OSError as e:
        print("microtun echo: cannot listen on %s: %s" % (addr, e.strerror or e), file=sys.stderr)
        return 1
    print("microtun echo: listening on %s; every datagram goes back to its sender (Ctrl-C stops)" % addr, flush=True)
    n = 0
    try:
        while True:
            data, src = s.recvfrom(65535)
            s.sendto(data, src)
            n += 1
            if n <= show:
                print("%d: %d bytes from %s:%d: %r" % (n, len(data), src[0], src[1], bytes(data[:40])), flush=True)
            elif n % 100 == 0:
                print("%d datagrams echoed" % n, flush=True)
    except KeyboardInterrupt:
        print("microtun echo: %d datagrams echoed" % n)
        return 0
    finally:
        s.close()
