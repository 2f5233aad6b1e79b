"""Socket reads that keep to one deadline, whatever the pace of the client (``awenc serve``'s request reader)."""
from __future__ import annotations

import io
import socket
import time
from typing import Any


class RequestTimeout(Exception):
    """The client did not send its whole request before the server's per-request deadline."""


class DeadlineReader(io.RawIOBase):
    """Socket reads that all end by one deadline (a ``time.monotonic()`` value), whatever the client's pace."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeout
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buf)
        except TimeoutError:
            raise RequestTimeout from None
