"""Start a worker: ``python -m app.worker.start``.

SIGTERM or SIGINT stops claiming, lets running tasks finish for ``worker.shutdown_grace_seconds``,
then releases what is left so that another worker takes it over at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from app.core.config import load_settings
from app.core.logging import configure_logging
from app.errors import TorontoAIError
from app.runtime import Runtime
from app.worker.runner import Worker

logger = logging.getLogger(__name__)


async def run_worker(concurrency: int | None) -> None:
    settings = load_settings()
    if concurrency is not None:
        settings = settings.model_copy(
            update={"worker": settings.worker.model_copy(update={"concurrency": concurrency})}
        )
    configure_logging(settings.log_level, settings.log_format)

    runtime = await Runtime.start(settings, migrate=False)
    worker = Worker(
        runtime.database, runtime.executor, settings, ingestor=runtime.ingestor, signals=runtime.signals
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    try:
        await worker.run()
    finally:
        await runtime.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.worker.start",
        description="Run a worker that claims and executes tasks.",
        allow_abbrev=False,
    )
    parser.add_argument("--concurrency", type=int, help="tasks run at once (default: worker.concurrency)")
    arguments = parser.parse_args(argv)
    if arguments.concurrency is not None and arguments.concurrency < 1:
        parser.error(f"--concurrency must be at least 1, got {arguments.concurrency}")
    try:
        asyncio.run(run_worker(arguments.concurrency))
    except TorontoAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
