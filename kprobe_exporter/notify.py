"""Notify: the sd_notify datagram protocol (READY=1, WATCHDOG=1, STOPPING=1) without a dependency."""

from __future__ import annotations

import os
import socket
import time


class SystemdNotifier:
    """Speaks to $NOTIFY_SOCKET when systemd set it; does nothing otherwise."""

    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET", "")
        self.addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        ok = usec.isdigit() and (not pid or pid == str(os.getpid()))
        # Ping at half the timeout, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if ok else 0.0
        self._last_ping = 0.0

    def send(self, state: str) -> None:
        if not self.addr:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(state.encode(), self.addr)
            except OSError:
                pass  # a notify socket that vanished must not stop the agent

    def ping(self) -> None:
        if self.watchdog_interval and time.monotonic() - self._last_ping >= self.watchdog_interval:
            self._last_ping = time.monotonic()
            self.send("WATCHDOG=1")
