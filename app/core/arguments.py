"""Argument types shared by the command-line entry points."""

from __future__ import annotations

import argparse


def port_number(text: str) -> int:
    """Parse a TCP port; 0 is accepted and means any free port where a command allows it."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a TCP port; use a number from 1 to 65535"
        ) from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port; use a number from 1 to 65535")
    return port
