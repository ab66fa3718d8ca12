"""Command-line interface: ``python -m app.cli COMMAND``.

Commands:
  migrate          bring the database schema up to date
  create-api-key   create an API key for production use and print it once
  list-api-keys    list the keys by prefix and name, never the keys themselves
  revoke-api-key   revoke a key, given whole or by its 8-character prefix
  serve            run an API instance and a worker in one process
  demo             run the all-in-one process, submit an example brief, follow it, print the report
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime
from pathlib import Path

from app.cli.demo import run_demo
from app.core.arguments import parse_command_line, port_number, port_or_zero
from app.core.config import load_settings
from app.core.logging import configure_logging
from app.errors import TorontoAIError


async def migrate() -> None:
    from app.db.engine import Database
    from app.db.migrate import upgrade

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    database = Database(settings.database)
    try:
        await upgrade(database)
        print(f"schema of {database.describe()} is current")
    finally:
        await database.dispose()


async def create_key(name: str) -> None:
    from app.api.auth import create_api_key
    from app.db.engine import Database
    from app.db.migrate import check_schema

    database = Database(load_settings().database)
    try:
        await check_schema(database)
        async with database.transaction() as connection:
            key = await create_api_key(connection, name)
    finally:
        await database.dispose()
    print(key)
    print(
        "Store this key now: only its hash is kept. Send it as `Authorization: Bearer <key>`.",
        file=sys.stderr,
    )


async def revoke_key(key_or_prefix: str) -> int:
    from app.api.auth import revoke_api_key
    from app.db.engine import Database
    from app.db.migrate import check_schema

    database = Database(load_settings().database)
    try:
        await check_schema(database)
        async with database.transaction() as connection:
            count = await revoke_api_key(connection, key_or_prefix)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        await database.dispose()
    if not count:
        print(
            f"error: no active API key matches {key_or_prefix!r}; "
            "`python -m app.cli list-api-keys` shows the active ones",
            file=sys.stderr,
        )
        return 1
    print(f"revoked {count} key(s)")
    return 0


async def list_keys() -> None:
    from app.api.auth import list_api_keys
    from app.db.engine import Database
    from app.db.migrate import check_schema

    database = Database(load_settings().database)
    try:
        await check_schema(database)
        async with database.read() as connection:
            keys = await list_api_keys(connection)
    finally:
        await database.dispose()
    if not keys:
        print("no API keys; create one with `python -m app.cli create-api-key --name NAME`")
        return
    print(f"{'PREFIX':<10} {'CREATED (UTC)':<20} {'STATUS':<28} NAME")
    for key in keys:
        status = "active" if key["revoked_at"] is None else f"revoked {_utc(key['revoked_at'])}"
        print(f"{key['prefix']:<10} {_utc(key['created_at']):<20} {status:<28} {key['name']}")


def _utc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def serve(port: int | None) -> None:
    from app.api.server import serve_api

    settings = load_settings()
    if port is not None:
        settings = settings.model_copy(update={"port": port})
    configure_logging(settings.log_level, settings.log_format)
    serve_api(settings, embedded_worker=True)


def key_name(text: str) -> str:
    if not 1 <= len(text.strip()) <= 100:
        raise argparse.ArgumentTypeError(f"give a name of 1 to 100 characters, not {len(text)}")
    if not text.isprintable():
        # A listing prints the name as it is; control characters could rewrite the terminal.
        raise argparse.ArgumentTypeError(
            f"invalid name {text!r}: it contains control characters; use printable characters only"
        )
    return text.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.cli", description="TORONTO AI TEAM AGENT backend")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("migrate", help="bring the database schema up to date")

    create = commands.add_parser("create-api-key", help="create an API key and print it once")
    create.add_argument("--name", required=True, type=key_name, help="who or what uses the key, for listings")

    commands.add_parser("list-api-keys", help="list the keys by prefix and name")

    revoke = commands.add_parser("revoke-api-key", help="revoke a key, given whole or by its prefix")
    revoke.add_argument("key", help="the whole key, or its first 8 characters as list-api-keys shows them")

    serve_parser = commands.add_parser("serve", help="run an API instance and a worker in one process")
    serve_parser.add_argument("--port", type=port_number, help="TCP port (default: TORONTO_AI_PORT or 8000)")

    demo = commands.add_parser("demo", help="run an example project end to end and print its report")
    demo.add_argument(
        "--brief",
        help="a brief file, or the name of a shipped example "
        "(default: python-modernisation, which draws on the python-peps knowledge base)",
    )
    demo.add_argument("--knowledge", type=Path, help="a folder of documents to ingest and give the project")
    demo.add_argument(
        "--no-knowledge", action="store_true", help="run the default example without its knowledge base"
    )
    demo.add_argument(
        "--port", type=port_or_zero, default=0, help="TCP port of the demo server (default: any free port)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = parse_command_line(build_parser(), argv)
    try:
        if arguments.command == "migrate":
            asyncio.run(migrate())
        elif arguments.command == "create-api-key":
            asyncio.run(create_key(arguments.name))
        elif arguments.command == "list-api-keys":
            asyncio.run(list_keys())
        elif arguments.command == "revoke-api-key":
            return asyncio.run(revoke_key(arguments.key))
        elif arguments.command == "serve":
            serve(arguments.port)
        elif arguments.command == "demo":
            return asyncio.run(
                run_demo(arguments.brief, arguments.port, arguments.knowledge, not arguments.no_knowledge)
            )
    except TorontoAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
