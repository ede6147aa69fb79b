"""Integration harness: see microtun_host.localnet (shared with `make demo`)."""
from microtun_host.localnet import (Net, Echo, Recorder, parse_result, free_ports,  # noqa: F401
                                    ROOT, LIB, PY, py_env, mp_env, micropython)


def mpremote_bridge(client, timeout=5.0):
    """An mpremote bridge (microtun_host.opsbridge.serve) over client in a
    daemon thread; its socket:// URL once it listens."""
    import threading
    from microtun_host import opsbridge
    urls = []
    ready = threading.Event()

    def got(url):
        urls.append(url)
        ready.set()
    threading.Thread(target=opsbridge.serve, args=(client, "127.0.0.1:0"), kwargs={"ready": got},
                     daemon=True).start()
    if not ready.wait(timeout):
        raise TimeoutError("the mpremote bridge did not listen within %.0f s" % timeout)
    return urls[0]
