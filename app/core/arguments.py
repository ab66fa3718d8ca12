"""Argument types shared by the command-line entry points."""

from __future__ import annotations

import argparse


def port_number(text: str) -> int:
    """Parse a TCP port from 1 to 65535, the port a server announces and clients use."""
    port = port_or_zero(text)
    if port == 0:
        raise argparse.ArgumentTypeError(
            "0 is not a port clients can connect to; use a number from 1 to 65535"
        )
    return port


def port_or_zero(text: str) -> int:
    """Parse a TCP port, where 0 requests any free port, for commands that print the port they got."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a TCP port; use a number from 1 to 65535"
        ) from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port; use a number from 1 to 65535")
    return port


def parse_address(text: str) -> tuple[str, int]:
    """Parse ``host:port`` (``[v6-address]:port`` for IPv6); raises ValueError naming the fix."""
    if "://" in text:
        raise ValueError(f"{text!r} is not host:port; drop the scheme, as in 127.0.0.1:8001")
    host, separator, port_text = text.strip().rpartition(":")
    if not separator or not host:
        raise ValueError(f"{text!r} is not host:port; write it like 127.0.0.1:8001")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host or any(character.isspace() or character in ",;/" for character in host):
        # Several addresses run together, such as "a:8001 b:8002", or an IPv6 address
        # without brackets.
        raise ValueError(
            f"{text!r} is not one host:port; separate addresses with commas, as in "
            "127.0.0.1:8001,127.0.0.1:8002, and write IPv6 hosts in brackets, as in [::1]:8001"
        )
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} has no valid port; use a number from 1 to 65535 after the colon")
    return host, int(port_text)


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` like ``parser.parse_args``, but report an unknown option under its subcommand.

    argparse reports arguments that no parser recognized with the top-level usage, which
    lists only the subcommands. The usage of the subcommand the option followed shows the
    options that are valid there.
    """
    # A prefix such as --top for --top-k would otherwise be accepted, so a typo could pick
    # another option without a word.
    for each in _all_parsers(parser):
        each.allow_abbrev = False
    arguments, unknown = parser.parse_known_args(argv)
    if unknown:
        _innermost_parser(parser, arguments).error(f"unrecognized arguments: {' '.join(unknown)}")
    return arguments


def _innermost_parser(
    parser: argparse.ArgumentParser, arguments: argparse.Namespace
) -> argparse.ArgumentParser:
    """Return the parser of the subcommand that ``arguments`` selected, following nested subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(arguments, action.dest, None)
            if chosen in action.choices:
                return _innermost_parser(action.choices[chosen], arguments)
    return parser


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Return ``parser`` and the parsers of all its subcommands, nested ones included."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                found.extend(_all_parsers(subparser))
    return found
