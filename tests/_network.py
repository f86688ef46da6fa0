"""Test helper (not a test module): refuse every network connection and DNS lookup."""

from __future__ import annotations

import socket

import pytest


def refuse_network(mp: pytest.MonkeyPatch, *, allow_local: bool = True) -> list[object]:
    """Make ``connect``/``connect_ex`` and ``getaddrinfo`` raise; returns the list the refused
    addresses and host names are appended to. With ``allow_local`` (default) local (AF_UNIX)
    sockets still work: nnU-Net's worker processes talk over them."""
    attempts: list[object] = []
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(self, address, *args, **kwargs):
        if allow_local and self.family == socket.AF_UNIX:
            return connect(self, address, *args, **kwargs)
        attempts.append(address)
        raise OSError(f"network blocked in tests: {address}")

    def refuse_ex(self, address, *args, **kwargs):
        if allow_local and self.family == socket.AF_UNIX:
            return connect_ex(self, address, *args, **kwargs)
        return refuse(self, address)

    def no_dns(host, *args, **kwargs):
        attempts.append(host)
        raise OSError(f"DNS blocked in tests: {host}")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket.socket, "connect_ex", refuse_ex)
    mp.setattr(socket, "getaddrinfo", no_dns)
    return attempts
