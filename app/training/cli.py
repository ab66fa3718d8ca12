"""Knowledge-base command line: ``python -m app.training.cli COMMAND``.

Commands:
  create NAME              create a knowledge base
  ingest NAME PATH...      add files or folders (Markdown, reStructuredText, HTML, text) and ingest
                           them in this process with a progress bar
  query NAME TEXT          print the passages most similar to TEXT
  status NAME              print document and chunk counts, and failed documents
  delete NAME SOURCE       remove a document and its chunks
  vector_db                configure Chroma servers (--configure-scaling), repartition indices
                           (--partition-indices --partitions N), print layouts (--status)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path

from tqdm import tqdm

from app.core.arguments import parse_command_line
from app.core.config import Settings, load_settings
from app.core.logging import configure_logging
from app.errors import DocumentError, TorontoAIError
from app.knowledge import repository
from app.knowledge.documents import decode_document
from app.knowledge.repository import DocumentStatus, NewDocument
from app.runtime import Runtime
from app.training import vector_db

SUPPORTED_SUFFIXES = (".md", ".markdown", ".rst", ".txt", ".html", ".htm")
FILES_PER_REQUEST = 100


def collect_files(paths: list[Path]) -> list[tuple[str, Path]]:
    """Return (source, path) pairs; a folder contributes its supported files, named relative to it."""
    found: list[tuple[str, Path]] = []
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in SUPPORTED_SUFFIXES:
                    found.append((child.relative_to(path).as_posix(), child))
        elif path.is_file():
            found.append((path.name, path))
        else:
            raise DocumentError(f"{path}: no such file or folder")
    return found


def read_documents(files: list[tuple[str, Path]], max_bytes: int) -> tuple[list[NewDocument], list[str]]:
    """Decode every file; return the documents and one error line per rejected file."""
    accepted: list[NewDocument] = []
    rejected: list[str] = []
    for source, path in files:
        if not _is_utf8(source) or not _is_utf8(str(path)):
            rejected.append(f"{path!r}: the file name is not valid UTF-8; rename the file")
            continue
        try:
            text = decode_document(source, path.read_bytes(), max_bytes)
        except (DocumentError, OSError) as exc:
            rejected.append(f"{path}: {exc}")
            continue
        accepted.append(NewDocument(source=source, text=text, metadata={"path": str(path)}))
    return accepted, rejected


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def ingest(runtime: Runtime, name: str, paths: list[Path], create: bool) -> int:
    knowledge = runtime.knowledge
    # Listed before anything is created, so a mistyped path leaves no empty knowledge base.
    files = collect_files(paths)
    if create:
        async with runtime.database.read() as connection:
            exists = any(row.name == name for row in await repository.list_knowledge_bases(connection))
        if not exists:
            await knowledge.create(name, "")

    # Files are read and queued in slices, so a corpus of any size needs memory for one slice.
    accepted_count = 0
    rejected: list[str] = []
    for start in range(0, len(files), FILES_PER_REQUEST):
        accepted, rejected_here = read_documents(
            files[start : start + FILES_PER_REQUEST], runtime.settings.knowledge.max_document_bytes
        )
        for line in rejected_here:
            print(f"skipped {line}", file=sys.stderr)
        rejected.extend(rejected_here)
        if accepted:
            await knowledge.add_documents(name, accepted)
            accepted_count += len(accepted)
    if not accepted_count:
        print("error: no document to ingest", file=sys.stderr)
        return 1

    await _ingest_queued(runtime, name, accepted_count)

    row, counts = await knowledge.describe(name)
    print(
        f"{name}: {counts.get(DocumentStatus.READY, 0)} documents, {counts['chunks']} chunks "
        f"({counts.get(DocumentStatus.FAILED, 0)} failed, {len(rejected)} files skipped)"
    )
    return 1 if rejected or counts.get(DocumentStatus.FAILED) else 0


async def _ingest_queued(runtime: Runtime, name: str, total: int) -> None:
    """Ingest this base's queued documents here, while any running worker may help."""
    worker_id = f"cli-{uuid.uuid4().hex[:8]}"
    async with runtime.database.read() as connection:
        base = await repository.get_knowledge_base(connection, name)
    batch = runtime.settings.knowledge.ingestion_batch_documents

    with tqdm(total=total, unit="doc", desc=f"ingesting into {name}") as progress:
        while True:
            leased = await runtime.ingestor.claim(worker_id, batch, knowledge_base_id=base.id)
            if leased:
                await runtime.ingestor.process(worker_id, leased, progress=progress.update)
                continue
            _, counts = await runtime.knowledge.describe(name)
            waiting = counts.get(DocumentStatus.PENDING, 0) + counts.get(DocumentStatus.PROCESSING, 0)
            if not waiting:
                progress.update(total - progress.n)
                return
            await asyncio.sleep(0.5)  # another worker has leased the rest; wait for it


async def query(runtime: Runtime, name: str, text: str, top_k: int, source: str | None) -> int:
    found = await runtime.knowledge.query(name, text, top_k, source=source)
    if not found.results:
        print("no results: the knowledge base has no chunks yet", file=sys.stderr)
        return 1
    for rank, hit in enumerate(found.results, start=1):
        excerpt = " ".join(hit.text.split())[:300]
        print(f"{rank}. {hit.score:.3f}  {hit.source}  {hit.heading}\n   {excerpt}\n")
    return 0


async def status(runtime: Runtime, name: str) -> int:
    row, counts = await runtime.knowledge.describe(name)
    print(f"{row.name}: model {row.embedding_model} ({row.dimension} dimensions), version {row.version}")
    print(
        f"  documents: {counts.get(DocumentStatus.READY, 0)} ready, {counts.get(DocumentStatus.PENDING, 0)} pending, "
        f"{counts.get(DocumentStatus.PROCESSING, 0)} processing, {counts.get(DocumentStatus.FAILED, 0)} failed"
    )
    print(f"  chunks: {counts['chunks']}")
    async with runtime.database.read() as connection:
        failed = await repository.list_documents(connection, row.id, DocumentStatus.FAILED, 20, None)
    for document in failed:
        print(f"  failed {document.source}: {document.error}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.training.cli", description="Manage knowledge bases.")
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create", help="create a knowledge base")
    create.add_argument("name")
    create.add_argument("--description", default="")

    ingest_parser = commands.add_parser(
        "ingest", help="add files or folders and ingest them with a progress bar"
    )
    ingest_parser.add_argument("name")
    ingest_parser.add_argument(
        "paths", nargs="+", type=Path, help=f"files or folders ({', '.join(SUPPORTED_SUFFIXES)})"
    )
    ingest_parser.add_argument(
        "--create", action="store_true", help="create the knowledge base if it does not exist"
    )

    query_parser = commands.add_parser("query", help="print the passages most similar to a text")
    query_parser.add_argument("name")
    query_parser.add_argument("text")
    query_parser.add_argument("--top-k", type=int, default=5, help="results to print (default 5)")
    query_parser.add_argument("--source", help="only search this document")

    status_parser = commands.add_parser("status", help="print counts and failed documents")
    status_parser.add_argument("name")

    delete = commands.add_parser("delete", help="remove a document and its chunks")
    delete.add_argument("name")
    delete.add_argument("source")

    vector_db.add_parser(commands)
    return parser


async def run(arguments: argparse.Namespace, settings: Settings) -> int:
    if arguments.command == "vector_db":
        return await vector_db.run(arguments, settings)
    runtime = await Runtime.start(settings, migrate=True)
    try:
        if arguments.command == "create":
            await runtime.knowledge.create(arguments.name, arguments.description)
            print(f"created knowledge base {arguments.name}")
            return 0
        if arguments.command == "ingest":
            return await ingest(runtime, arguments.name, arguments.paths, arguments.create)
        if arguments.command == "query":
            return await query(runtime, arguments.name, arguments.text, arguments.top_k, arguments.source)
        if arguments.command == "status":
            return await status(runtime, arguments.name)
        await runtime.knowledge.delete_document(arguments.name, arguments.source)
        print(f"deleted {arguments.source} from {arguments.name}")
        return 0
    finally:
        await runtime.aclose()


def main(argv: list[str] | None = None) -> int:
    arguments = parse_command_line(build_parser(), argv)
    try:
        settings = load_settings()
        configure_logging("WARNING", settings.log_format)
        return asyncio.run(run(arguments, settings))
    except TorontoAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
