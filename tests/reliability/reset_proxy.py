"""A TCP proxy that resets a connection in the middle of a request body -- what a NAT timeout,
a load balancer restart or a flaky link does to an upload in flight."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class ResetProxy:
    """Forwards to ``target``. After :meth:`reset_next`, the next ``times`` connections that
    send ``after_bytes`` more to the server (counted from the call, so a single request body
    must cross the mark when the requests around it are small) are cut there with a TCP RST."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._after: int | None = None
        self._left = 0
        self._generation = 0
        self.resets = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset_next(self, after_bytes: int, times: int = 1) -> None:
        with self._lock:
            self._after, self._left = after_bytes, times
            self._generation += 1

    def _cut_now(self, sent: int) -> bool:
        with self._lock:
            if self._left > 0 and self._after is not None and sent >= self._after:
                self._left -= 1
                self.resets += 1
                return True
        return False

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            threading.Thread(target=self._pump_to_upstream, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump_to_client, args=(upstream, client), daemon=True).start()

    def _pump_to_upstream(self, client: socket.socket, upstream: socket.socket) -> None:
        sent, generation = 0, self._generation
        try:
            while data := client.recv(65536):
                if generation != self._generation:
                    sent, generation = 0, self._generation
                sent += len(data)
                if self._cut_now(sent):
                    for s in (client, upstream):
                        with contextlib.suppress(OSError):
                            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        s.close()
                    return
                upstream.sendall(data)
        except OSError:
            pass
        self._close(client, upstream)

    def _pump_to_client(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while data := upstream.recv(65536):
                client.sendall(data)
        except OSError:
            pass
        self._close(client, upstream)

    @staticmethod
    def _close(*sockets: socket.socket) -> None:
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._listener.close()
