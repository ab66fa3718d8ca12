"""Balance HTTP requests over several API instances, for development and tests.

    python -m app.deployment.simple_load_balancer --backends 127.0.0.1:8001,127.0.0.1:8002 --port 8000

Options override ``load_balancer.*`` in the configuration. See ``app.deployment.proxy`` for
what is retried and how responses are streamed, and ``app.deployment.backends`` for
ejection and slow start. Production deployments use nginx or a Kubernetes ingress instead.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from app.core.arguments import parse_address, port_number
from app.core.config import LoadBalancerSettings, load_settings
from app.core.listening import bind_socket
from app.core.logging import configure_logging
from app.deployment.backends import STRATEGIES
from app.deployment.proxy import LoadBalancer
from app.errors import TorontoAIError

logger = logging.getLogger(__name__)

# Connections the kernel queues before the balancer accepts them; nginx uses 511 on Linux.
BACKLOG = 2048


def backend_list(text: str) -> list[str]:
    """Parse ``--backends``: comma-separated host:port entries, each listed once."""
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if not entries:
        raise argparse.ArgumentTypeError(
            "no backend given; list API instances like 127.0.0.1:8001,127.0.0.1:8002"
        )
    seen: set[tuple[str, int]] = set()
    for entry in entries:
        try:
            address = parse_address(entry)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if address in seen:
            raise argparse.ArgumentTypeError(f"{entry!r} is listed twice; list each API instance once")
        seen.add(address)
    return entries


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m app.deployment.simple_load_balancer",
        # "--backend" would otherwise pass for "--backends", and a typo for a real option.
        allow_abbrev=False,
        description=(
            "Balance HTTP requests over several API instances (a development tool; use nginx in production)."
        ),
    )
    parser.add_argument(
        "--backends",
        type=backend_list,
        help="comma-separated API instances as host:port (default: load_balancer.backends, "
        "127.0.0.1:8001,127.0.0.1:8002,127.0.0.1:8003)",
    )
    parser.add_argument(
        "--port", type=port_number, help="TCP port to listen on (default: load_balancer.port, 8000)"
    )
    parser.add_argument("--host", help="address to bind (default: load_balancer.host, 127.0.0.1)")
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        help="how an instance is chosen (default: load_balancer.strategy, least_conn)",
    )
    return parser.parse_args(argv)


def run(settings: LoadBalancerSettings, max_body_bytes: int) -> None:
    """Serve until SIGINT or SIGTERM, then let requests in flight finish for ``shutdown_grace_seconds``.

    The process then ends by the signal it received, as a supervisor expects of a process
    that was stopped.
    """
    sock = bind_socket(settings.host, settings.port, "--port or load_balancer.port")
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        received = runner.run(serve(LoadBalancer(settings, max_body_bytes), sock))
    signal.signal(received, signal.SIG_DFL)
    os.kill(os.getpid(), received)


async def serve(balancer: LoadBalancer, sock: socket.socket) -> signal.Signals:
    """Run the balancer on a bound socket until a stop signal; return that signal."""
    loop = asyncio.get_running_loop()
    stopping: asyncio.Future[signal.Signals] = loop.create_future()
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(stop_signal, _resolve, stopping, stop_signal)

    await balancer.start()
    server = await loop.create_server(balancer.server.protocol_factory, sock=sock, backlog=BACKLOG)
    settings = balancer.settings
    logger.info(
        "load balancer listening on %s:%d",
        settings.host,
        settings.port,
        extra={"action": "lb.listening", "host": settings.host, "port": settings.port},
    )
    received = await stopping

    logger.info(
        "load balancer stopping on %s; requests in flight get %g s",
        received.name,
        settings.shutdown_grace_seconds,
        extra={"action": "lb.stopping", "signal": received.name},
    )
    server.close()
    await balancer.server.shutdown(settings.shutdown_grace_seconds)
    await balancer.stop()
    return received


def _resolve(future: asyncio.Future[signal.Signals], received: signal.Signals) -> None:
    if not future.done():
        future.set_result(received)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's event loop where it is installed (it comes with uvicorn[standard]), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings()
        overrides = {
            key: value
            for key, value in (
                ("backends", arguments.backends),
                ("port", arguments.port),
                ("host", arguments.host),
                ("strategy", arguments.strategy),
            )
            if value is not None
        }
        balancer_settings = settings.load_balancer.model_copy(update=overrides)
        configure_logging(settings.log_level, settings.log_format)
        run(balancer_settings, settings.api.max_body_bytes)
    except TorontoAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
