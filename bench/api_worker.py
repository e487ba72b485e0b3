"""The daemon's HTTP API over a catalog, in a process of its own (as the daemon serves it), for
bench.catalog to time requests against and read the peak RSS of. Run as a module:

    python -m bench.api_worker --config FILE

Prints ``port N`` once listening; serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import threading

from backupd.app import App
from backupd.config import load_config
from backupd.logs import configure


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    args = ap.parse_args()
    configure(level="warning", json_output=True)
    app = App(load_config(args.config))
    server = app.http_server("127.0.0.1:0")  # exactly what `backupd run` serves
    _host, port = server.start()
    print(f"port {port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop()
    app.close()


if __name__ == "__main__":
    main()
