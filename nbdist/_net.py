"""Addresses and ports, asked of the operating system (both sides use these)."""

from __future__ import annotations

import socket

from nbdist._wire import LOOPBACK

__all__ = ["LOOPBACK", "free_port", "loopback_interface", "route_address"]


def loopback_interface() -> str:
    """The name of the interface that holds 127.0.0.1 (`lo` on Linux)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == LOOPBACK for a in addresses):
            return name
    return "lo"


def route_address(target: str) -> str:
    """The local address this machine uses to reach `target`: reachable from it, by construction.

    A UDP socket's connect sends nothing; it only asks the kernel's routing table."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((target, 9))
        return str(sock.getsockname()[0])


def free_port(bind_addr: str) -> int:
    """A port that is free on this host at `bind_addr`, where a rendezvous will listen."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind_addr, 0))
        port: int = sock.getsockname()[1]
        return port
