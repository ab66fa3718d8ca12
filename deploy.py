"""Start one API instance: ``python deploy.py --port 8001``.

Instances are stateless; run as many as the load needs, behind a load balancer, with
workers started separately (``python -m app.worker.start``).
"""

from __future__ import annotations

import argparse
import sys

from app.api.server import serve_api
from app.core.arguments import port_number
from app.core.config import load_settings
from app.core.logging import configure_logging
from app.errors import TorontoAIError


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Start one API instance of the TORONTO AI TEAM AGENT backend.", allow_abbrev=False
    )
    parser.add_argument(
        "--port", type=port_number, help="TCP port to listen on (default: TORONTO_AI_PORT or 8000)"
    )
    parser.add_argument("--host", help="address to bind (default: TORONTO_AI_HOST or 127.0.0.1)")
    parser.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not migrate the schema at start-up; refuse to serve if it is not current",
    )
    parser.add_argument(
        "--with-worker",
        action="store_true",
        help="also run a worker in this process (the all-in-one mode for a first try)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings()
        overrides = {
            key: value
            for key, value in (("port", arguments.port), ("host", arguments.host))
            if value is not None
        }
        settings = settings.model_copy(update=overrides)
        configure_logging(settings.log_level, settings.log_format)
        serve_api(settings, migrate=not arguments.no_migrate, embedded_worker=arguments.with_worker)
    except TorontoAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
