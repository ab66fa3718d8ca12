"""``python -m app.training.cli vector_db``: scaling configuration and repartitioning of indices.

``--configure-scaling`` writes the ``vector_db`` section of ``config/vector_db_config.json``
from ``--instances``, ``--partitions`` and ``--replicas``, or asks for them when run in a
terminal without them, after checking that every instance responds to its heartbeat.
``--partition-indices`` moves every knowledge base (or the one named) onto ``--partitions``
partitions; ``--rollback`` drops what an interrupted run had built instead of resuming it.
``--status`` lists the instances and each knowledge base's layouts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tqdm import tqdm

from app.core.config import CONFIG_DIR_VARIABLE, ChromaInstance, Settings, VectorDbSettings
from app.errors import ConfigError, VectorStoreError
from app.knowledge import layouts, repository
from app.knowledge.chroma import ChromaInstances
from app.knowledge.chroma_store import ChromaVectorStore
from app.knowledge.repartition import Outcome, Repartitioner
from app.runtime import Runtime

CONFIG_FILE = Path("config") / "vector_db_config.json"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "vector_db",
        help="configure Chroma servers and repartition knowledge-base indices",
        description="Configure the Chroma servers that hold knowledge-base vectors, and repartition "
        "existing indices over them.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--configure-scaling",
        action="store_true",
        help="write the vector_db section of config/vector_db_config.json (asks in a terminal without flags)",
    )
    mode.add_argument(
        "--partition-indices",
        action="store_true",
        help="repartition existing knowledge bases onto --partitions partitions",
    )
    mode.add_argument(
        "--status", action="store_true", help="print instances and each knowledge base's layout"
    )
    parser.add_argument("--instances", help="Chroma servers as host:port,host:port")
    parser.add_argument("--partitions", type=int, help="partitions per knowledge base (1 to 256)")
    parser.add_argument("--replicas", type=int, help="copies of each partition beyond the primary")
    parser.add_argument(
        "--config-file",
        type=Path,
        help=f"file to write (default: {CONFIG_FILE} under ${CONFIG_DIR_VARIABLE} or the current folder)",
    )
    parser.add_argument("--knowledge-base", help="repartition only this knowledge base")
    parser.add_argument(
        "--batch-size", type=int, help="vectors copied per batch (default: vector_db.write_batch_size)"
    )
    parser.add_argument(
        "--rollback",
        action="store_true",
        help="with --partition-indices: drop an interrupted run's new layout instead of resuming it",
    )


# The options each mode reads; any other option given is an error rather than ignored.
MODE_OPTIONS = {
    "configure_scaling": {"instances", "partitions", "replicas", "config_file"},
    "partition_indices": {"partitions", "knowledge_base", "batch_size", "rollback"},
    "status": set(),
}
OPTION_VALUES = (
    "instances",
    "partitions",
    "replicas",
    "config_file",
    "knowledge_base",
    "batch_size",
    "rollback",
)


def check_options(arguments: argparse.Namespace) -> None:
    """Raise ConfigError for an option that the chosen mode would not use."""
    mode = next(mode for mode in MODE_OPTIONS if getattr(arguments, mode))
    # Identity checks: `--replicas 0` is given, though 0 == False.
    given = [
        name
        for name in OPTION_VALUES
        if getattr(arguments, name) is not None and getattr(arguments, name) is not False
    ]
    unused = [name for name in given if name not in MODE_OPTIONS[mode]]
    if not unused:
        return
    flags = ", ".join("--" + name.replace("_", "-") for name in unused)
    hint = ""
    if mode == "partition_indices" and "replicas" in unused:
        hint = "; replicas come from vector_db.replicas, set with --configure-scaling --replicas R"
    raise ConfigError(f"vector_db --{mode.replace('_', '-')} does not take {flags}{hint}")


async def run(arguments: argparse.Namespace, settings: Settings) -> int:
    check_options(arguments)
    if arguments.configure_scaling:
        return await configure_scaling(arguments, settings)
    if arguments.status:
        return await print_status(settings)
    return await partition_indices(arguments, settings)


def parse_instances(text: str) -> list[ChromaInstance]:
    """Parse ``host:port,host:port``; raise ConfigError naming the first invalid entry."""
    instances = []
    for entry in (part.strip() for part in text.split(",")):
        host, _, port = entry.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"--instances: {entry!r} is not host:port with a port from 1 to 65535")
        instances.append(ChromaInstance(host=host, port=int(port)))
    return instances


async def configure_scaling(arguments: argparse.Namespace, settings: Settings) -> int:
    current = settings.vector_db
    given = any(
        value is not None for value in (arguments.instances, arguments.partitions, arguments.replicas)
    )
    if not given:
        if not sys.stdin.isatty():
            raise ConfigError(
                "vector_db --configure-scaling: give --instances host:port,... --partitions N --replicas R, "
                "or run it in a terminal to be asked for them"
            )
        instances_text, partitions, replicas = ask(current)
    else:
        instances_text = arguments.instances or ",".join(instance.address for instance in current.instances)
        partitions = arguments.partitions if arguments.partitions is not None else current.partitions
        replicas = arguments.replicas if arguments.replicas is not None else current.replicas
    if not instances_text:
        raise ConfigError(
            "vector_db --configure-scaling: --instances is missing; list the Chroma servers as host:port"
        )

    section = _validated_section(current, parse_instances(instances_text), partitions, replicas)
    await check_instances(section)
    path = arguments.config_file or Path(os.environ.get(CONFIG_DIR_VARIABLE, ".")) / CONFIG_FILE
    write_section(path, section)

    print(f"wrote {path}: {len(section.instances)} instances, {partitions} partitions, {replicas} replicas")
    for partition, replicas_of in enumerate(section.placement_for(partitions)):
        print(f"  partition {partition}: {', '.join(replicas_of)}")
    print(
        "New knowledge bases use this layout. Move existing ones with "
        f"`python -m app.training.cli vector_db --partition-indices --partitions {partitions}`."
    )
    return 0


def ask(current: VectorDbSettings) -> tuple[str, int, int]:
    """Ask for the instances, partitions and replicas, offering the current values."""
    default_instances = ",".join(instance.address for instance in current.instances) or "127.0.0.1:8000"
    instances = _prompt("Chroma servers (host:port,host:port)", default_instances)
    partitions = _prompt_int("Partitions per knowledge base", current.partitions)
    replicas = _prompt_int("Copies of each partition beyond the primary", current.replicas)
    return instances, partitions, replicas


def _prompt(question: str, default: str) -> str:
    answer = input(f"{question} [{default}]: ").strip()
    return answer or default


def _prompt_int(question: str, default: int) -> int:
    while True:
        answer = _prompt(question, str(default))
        if answer.isdigit():
            return int(answer)
        print(f"  {answer!r} is not a whole number; try again")


def _validated_section(
    current: VectorDbSettings, instances: list[ChromaInstance], partitions: int, replicas: int
) -> VectorDbSettings:
    values = current.model_dump(exclude={"placement"})
    values.update(
        provider="chroma",
        instances=[instance.model_dump() for instance in instances],
        partitions=partitions,
        replicas=replicas,
    )
    try:
        return VectorDbSettings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'vector_db'}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        )
        raise ConfigError(f"invalid scaling configuration: {problems}") from exc


async def check_instances(section: VectorDbSettings) -> None:
    """Raise VectorStoreError naming every instance that does not respond to its heartbeat."""
    instances = ChromaInstances(section)
    failures = []
    for instance in section.instances:
        try:
            await instances.heartbeat(instance.address, retries=1)
        except VectorStoreError as exc:
            failures.append(str(exc))
    if failures:
        raise VectorStoreError("; ".join(failures))


def write_section(path: Path, section: VectorDbSettings) -> None:
    """Replace the file's vector_db key, keeping its other keys; write atomically."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give the path of a JSON file, such as {path / 'config.json'}")
    document: dict[str, Any] = {}
    if path.is_file():
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc}); fix or remove the file") from exc
    changed = {
        "provider": "chroma",
        "instances": [instance.model_dump() for instance in section.instances],
        "partitions": section.partitions,
        "replicas": section.replicas,
    }
    document["vector_db"] = {
        key: value for key, value in document.get("vector_db", {}).items() if key != "placement"
    } | changed
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


async def partition_indices(arguments: argparse.Namespace, settings: Settings) -> int:
    if settings.vector_db.provider != "chroma":
        raise ConfigError(
            "vector_db.provider is 'embedded', so there are no partitions to fill; run "
            "`python -m app.training.cli vector_db --configure-scaling` first"
        )
    partitions = arguments.partitions if arguments.partitions is not None else settings.vector_db.partitions
    if not 1 <= partitions <= 256:
        raise ConfigError(f"--partitions: {partitions} is outside 1 to 256")
    if arguments.batch_size is not None and arguments.batch_size < 1:
        raise ConfigError(f"--batch-size: {arguments.batch_size} must be at least 1")
    try:
        settings.vector_db.placement_for(partitions)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc

    runtime = await Runtime.start(settings, migrate=True)
    try:
        store = runtime.knowledge.store
        if not isinstance(store, ChromaVectorStore):
            raise ConfigError("vector_db.provider must be 'chroma' to repartition")
        repartitioner = Repartitioner(
            runtime.database,
            store,
            settings.vector_db,
            batch_size=arguments.batch_size,
            progress=_progress_bar,
        )
        async with runtime.database.read() as connection:
            if arguments.knowledge_base:
                bases = [await repository.get_knowledge_base(connection, arguments.knowledge_base)]
            else:
                bases = await repository.list_knowledge_bases(connection)
        if not bases:
            print("no knowledge base to repartition")
            return 0
        for base in bases:
            if arguments.rollback:
                outcome = await repartitioner.rollback(base)
            else:
                outcome = await repartitioner.repartition(base, partitions)
            print(describe(outcome))
        return 0
    finally:
        await runtime.aclose()


def describe(outcome: Outcome) -> str:
    if outcome.action == "unchanged":
        return f"{outcome.knowledge_base}: already in {outcome.partitions} partitions"
    if outcome.action != "repartitioned":
        return f"{outcome.knowledge_base}: {outcome.action}"
    before = "the database only"
    if outcome.previous_partitions is not None:
        before = f"{outcome.previous_partitions} partition{'s' if outcome.previous_partitions != 1 else ''}"
    line = f"{outcome.knowledge_base}: {outcome.vectors} vectors moved from {before} to {outcome.partitions}"
    if outcome.resumed_from:
        line += f" (resumed after {outcome.resumed_from})"
    if outcome.repaired:
        line += f", {outcome.repaired} repaired during verification"
    if outcome.leftover_instances:
        line += (
            f"; the old layout's collections on {', '.join(outcome.leftover_instances)} could not be "
            "dropped: start those servers and run the command again"
        )
    return line


def _progress_bar(description: str, total: int, initial: int) -> tqdm:
    return tqdm(total=total, initial=initial, unit="vec", desc=description)


async def print_status(settings: Settings) -> int:
    section = settings.vector_db
    print(f"provider: {section.provider}")
    instances = ChromaInstances(section)
    for instance in section.instances:
        try:
            await instances.heartbeat(instance.address, retries=0)
            state = "responds"
        except VectorStoreError:
            state = "unreachable"
        print(f"  instance {instance.address}: {state}")
    runtime = await Runtime.start(settings, migrate=True)
    try:
        async with runtime.database.read() as connection:
            for base in await repository.list_knowledge_bases(connection):
                found = await layouts.list_layouts(connection, base.id)
                shown = [
                    f"v{layout.version} {layout.status} {layout.partitions}p"
                    for layout in found
                    if layout.status != "deleted"
                ]
                print(f"{base.name}: {', '.join(shown) or 'no layout (database only)'}")
    finally:
        await runtime.aclose()
    return 0
