"""The listening socket of a server, bound before uvicorn starts."""

from __future__ import annotations

import errno
import socket

from app.errors import ConfigError


def bind_socket(host: str, port: int, port_option: str) -> socket.socket:
    """Bind a TCP socket to ``host:port``, so that a taken or invalid address is one clear error.

    Raises ConfigError naming the address and ``port_option``, the flag or setting that
    chooses another port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"cannot listen on {host}:{port}: port {port} is already in use; stop the process "
                f"that listens on it or choose another port with {port_option}"
            ) from exc
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; check the host and {port_option}"
        ) from exc
    listener.set_inheritable(True)
    return listener
