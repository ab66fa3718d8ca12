"""Benchmark of query distribution: one Chroma server against 4 partitions over 2 servers.

Run ``python -m bench.vector_scaling`` (about 6 minutes on a shared 2-core machine). For each data
set, the PEP corpus vectors (``bench.vector_corpus``) and synthetic clustered vectors of the
same dimension, it:

1. starts two ``chroma run`` servers on loopback ports, with data in a temporary folder;
2. writes the vectors through ``ChromaVectorStore.upsert`` (batches within the server's max
   batch size) into two layouts: 1 partition on the first server, and 4 partitions placed
   alternately on both servers;
3. for each HNSW ``ef_search`` value (set on every collection, then both servers restarted,
   because a running Chroma 1.5.9 server keeps the value its index was loaded with), sends
   the same queries from ``--clients`` concurrent clients, each one query at a time through
   ``QueryDistributor.query`` (every partition in parallel, merged by distance then chunk id).
   The clients are asyncio tasks spread evenly over ``--processes`` processes, and the clients
   of one process share one ``QueryDistributor``, as the requests that one API process serves
   do. Each measurement runs twice: with the distributor's default coalescing of concurrent
   queries, and with ``query_batch_max`` 1, one request per query and partition. It reports
   queries per second, latency percentiles, recall@10 against an exact numpy search, and the
   CPU seconds the servers and the clients spent per query;
4. compares the two layouts at the smallest ``ef_search`` with recall@10 of at least 0.95,
   both coalesced, and reports each against one server with one request per query.

Then, on the PEP vectors stored in a SQLite knowledge base on the 4-partition layout, it
times ``KnowledgeService.query`` uncached and cached (the same texts again) with the same
number of concurrent clients. Query texts map to prepared vectors, so no model runs.

Results go to bench/results/ as JSON and, unless ``--no-docs``, to the vector_scaling section
of docs/benchmarks.md with a plot in docs/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.cache import Cache, CacheKind
from app.cache.memory import MemoryBackend
from app.core.config import VectorDbSettings
from app.knowledge.chroma import ChromaInstances
from app.knowledge.chroma_store import ChromaVectorStore, VectorRecord
from app.knowledge.layouts import Layout, LayoutStatus
from app.knowledge.partitions import QueryDistributor
from bench.knowledge_machine import describe_machine, describe_source
from bench.vector_corpus import pep_vectors, synthetic_vectors
from tests.services.chroma import start_servers

logger = logging.getLogger("bench.vector_scaling")

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
RESULTS_FOLDER = REPOSITORY_ROOT / "bench" / "results"
DEFAULT_PEP_VECTORS = RESULTS_FOLDER / "pep_vectors-8000.npy"
SEED = 20261205
TOP_K = 10
RECALL_TARGET = 0.95
QPS_TARGET_FACTOR = 1.2
SINGLE = "1 server, 1 partition"
PARTITIONED = "2 servers, 4 partitions"
COALESCED = "coalesced"
ONE_PER_QUERY = "one request per query"
WARM_UP_QUERIES = 20
WRITE_BATCH = 1000


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.vector_scaling", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--ports", default="58030,58031", help="two loopback ports for the Chroma servers")
    parser.add_argument(
        "--pep-vectors", type=Path, default=DEFAULT_PEP_VECTORS, help=".npy of PEP chunk vectors"
    )
    parser.add_argument(
        "--pep-chunks",
        type=int,
        default=8000,
        help="distinct PEP chunks to embed when --pep-vectors is missing",
    )
    parser.add_argument("--synthetic", type=int, default=200_000, help="synthetic vectors (0 skips them)")
    parser.add_argument("--clusters", type=int, default=2000, help="centres of the synthetic vectors")
    parser.add_argument("--spread", type=float, default=0.8, help="noise norm around each centre")
    parser.add_argument(
        "--clients", type=int, default=8, help="concurrent clients, each sending one query at a time"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="client processes; the clients are asyncio tasks spread evenly over them",
    )
    parser.add_argument(
        "--queries", type=int, default=800, help="queries per measurement, split over the clients"
    )
    parser.add_argument("--query-noise", type=float, default=0.5, help="noise norm added to stored vectors")
    parser.add_argument("--ef-search", default="10,40,100", help="HNSW ef_search values to measure")
    parser.add_argument("--docs", action=argparse.BooleanOptionalAction, default=True, help="write docs")
    arguments = parser.parse_args(argv)
    arguments.ports = [int(port) for port in arguments.ports.split(",")]
    arguments.ef_search = [int(value) for value in arguments.ef_search.split(",")]
    if len(arguments.ports) != 2:
        parser.error("--ports takes exactly two ports")
    if not 1 <= arguments.processes <= arguments.clients:
        parser.error(f"--processes must be between 1 and --clients ({arguments.clients})")
    return arguments


def make_queries(matrix: np.ndarray, count: int, noise: float, seed: int) -> np.ndarray:
    generator = np.random.default_rng(seed)
    rows = generator.choice(len(matrix), size=count, replace=False)
    perturbation = generator.standard_normal((count, matrix.shape[1])).astype(np.float32)
    perturbation *= noise / np.linalg.norm(perturbation, axis=1, keepdims=True)
    queries = matrix[rows] + perturbation
    return np.ascontiguousarray(queries / np.linalg.norm(queries, axis=1, keepdims=True), dtype=np.float32)


def exact_top_k(matrix: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    top = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 100):
        scores = queries[start : start + 100] @ matrix.T
        candidates = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, candidates, axis=1), axis=1)
        top[start : start + 100] = np.take_along_axis(candidates, order, axis=1)
    return top


def recall(found: list[list[str]], truth: np.ndarray) -> float:
    hits = sum(
        len({int(chunk) for chunk in ids} & set(row.tolist())) for ids, row in zip(found, truth, strict=True)
    )
    return hits / truth.size


def layout_of(name: str, placement: list[list[str]]) -> Layout:
    return Layout(0, name, 1, LayoutStatus.ACTIVE, len(placement), tuple(map(tuple, placement)), None, 0)


def vector_settings(ports: list[int]) -> VectorDbSettings:
    return VectorDbSettings(
        provider="chroma",
        instances=[{"host": "127.0.0.1", "port": port} for port in ports],
        write_batch_size=WRITE_BATCH,
        query_timeout_seconds=30.0,
        request_timeout_seconds=120.0,
    )


def query_settings(settings: VectorDbSettings, mode: str) -> VectorDbSettings:
    """Return ``settings`` with the coalescing of ``mode``: the defaults, or none at all."""
    if mode == COALESCED:
        return settings
    # Every query goes out at once on its own, as before coalescing existed.
    return settings.model_copy(update={"query_batch_max": 1, "query_requests_in_flight": 256})


async def load(settings: VectorDbSettings, layout: Layout, matrix: np.ndarray) -> float:
    """Write every vector into ``layout``; return vectors per second."""
    store = ChromaVectorStore(None, matrix.shape[1], settings)  # upsert needs no database
    await store.create_collections(layout)
    started = time.perf_counter()
    for start in range(0, len(matrix), 10_000):
        records = [
            VectorRecord(str(row), matrix[row], "bench", "bench")
            for row in range(start, min(start + 10_000, len(matrix)))
        ]
        await store.upsert(layout, records)
    return len(matrix) / (time.perf_counter() - started)


async def set_ef_search(settings: VectorDbSettings, layout: Layout, ef_search: int) -> None:
    instances = ChromaInstances(settings)
    for partition, replicas in enumerate(layout.placement):
        for address in replicas:
            collection = await instances.collection(address, layout.collection(partition), create=False)
            await collection.modify(configuration={"hnsw": {"ef_search": ef_search}})


def client_process(settings_json: str, layout: Layout, lanes: dict[int, np.ndarray], barrier, output) -> None:
    """Run one asyncio client per lane, each sending its queries one at a time, after a warm-up.

    The clients share one ``QueryDistributor``. Puts (latencies and ids per lane, start, end,
    CPU seconds) on ``output``.
    """
    settings = VectorDbSettings.model_validate_json(settings_json)

    async def run() -> None:
        distributor = QueryDistributor(ChromaInstances(settings), settings)

        async def client(queries: np.ndarray, latencies: list[float], found: list[list[str]]) -> None:
            for query in queries:
                started = time.perf_counter()
                result = await distributor.query(layout, query, TOP_K)
                latencies.append(time.perf_counter() - started)
                if result.missing_partitions:
                    raise RuntimeError(f"partitions {result.missing_partitions} did not respond")
                found.append([candidate.chunk_id for candidate in result.candidates])

        await asyncio.gather(*(client(queries[:WARM_UP_QUERIES], [], []) for queries in lanes.values()))
        await asyncio.to_thread(barrier.wait)
        measured = {lane: ([], []) for lane in lanes}
        began = time.time()
        cpu_started = time.process_time()
        await asyncio.gather(*(client(queries, *measured[lane]) for lane, queries in lanes.items()))
        output.put((measured, began, time.time(), time.process_time() - cpu_started))

    asyncio.run(run())


def cpu_seconds(pids: list[int]) -> float:
    """Return the user and system CPU seconds that processes ``pids`` have used so far."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15 of stat
    return ticks / os.sysconf("SC_CLK_TCK")


def server_pids(servers) -> list[int]:
    """Return the pids of the servers and of their children (``chroma run`` may fork the server)."""
    pids = []
    for server in servers:
        pids.append(server.process.pid)
        children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
        if children.exists():
            pids.extend(int(pid) for pid in children.read_text().split())
    return pids


def measure_throughput(
    settings: VectorDbSettings,
    layout: Layout,
    queries: np.ndarray,
    truth: np.ndarray,
    arguments: argparse.Namespace,
    servers,
) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(arguments.processes + 1)  # the clients and this process, which reads CPU times
    output = context.Queue()
    slices = np.array_split(np.arange(len(queries)), arguments.clients)
    processes = [
        context.Process(
            target=client_process,
            args=(
                settings.model_dump_json(),
                layout,
                {
                    lane: queries[slices[lane]]
                    for lane in range(number, arguments.clients, arguments.processes)
                },
                barrier,
                output,
            ),
        )
        for number in range(arguments.processes)
    ]
    for process in processes:
        process.start()
    barrier.wait()
    server_cpu_before = cpu_seconds(server_pids(servers))
    results = [output.get(timeout=600) for _ in processes]
    server_cpu = cpu_seconds(server_pids(servers)) - server_cpu_before
    for process in processes:
        process.join()
    latencies = np.array([value for result in results for lane in result[0].values() for value in lane[0]])
    latencies *= 1000
    wall = max(result[2] for result in results) - min(result[1] for result in results)
    found: list[list[str]] = [[] for _ in range(len(queries))]
    for measured, _, _, _ in results:
        for lane, (_, ids) in measured.items():
            for index, row in zip(slices[lane], ids, strict=True):
                found[index] = row
    return {
        "qps": len(queries) / wall,
        "ms_p50": float(np.percentile(latencies, 50)),
        "ms_p95": float(np.percentile(latencies, 95)),
        "ms_p99": float(np.percentile(latencies, 99)),
        "recall_at_10": recall(found, truth),
        "server_cpu_ms_per_query": server_cpu * 1000 / len(queries),
        "client_cpu_ms_per_query": sum(result[3] for result in results) * 1000 / len(queries),
    }


def restart(servers) -> None:
    for server in servers:
        server.stop()
    for server in servers:
        server.start()


async def measure_data_set(
    name: str, matrix: np.ndarray, arguments: argparse.Namespace, settings: VectorDbSettings, servers
) -> dict[str, Any]:
    addresses = [instance.address for instance in settings.instances]
    layouts = {
        SINGLE: layout_of(f"{name}-single", [[addresses[0]]]),
        PARTITIONED: layout_of(f"{name}-partitioned", [[addresses[partition % 2]] for partition in range(4)]),
    }
    queries = make_queries(matrix, arguments.queries, arguments.query_noise, SEED)
    logger.info("%s: exact top %d of %d queries over %d vectors", name, TOP_K, len(queries), len(matrix))
    truth = exact_top_k(matrix, queries, TOP_K)
    result: dict[str, Any] = {"vectors": len(matrix), "dimension": int(matrix.shape[1]), "layouts": {}}
    for label, layout in layouts.items():
        logger.info("%s: writing %d vectors into %s", name, len(matrix), label)
        entry: dict[str, Any] = {
            "write_vectors_per_second": await load(settings, layout, matrix),
            "by_ef_search": {},
        }
        for ef_search in arguments.ef_search:
            await set_ef_search(settings, layout, ef_search)
            restart(servers)
            by_mode = {}
            for mode in (COALESCED, ONE_PER_QUERY):
                measured = measure_throughput(
                    query_settings(settings, mode), layout, queries, truth, arguments, servers
                )
                logger.info(
                    "%s, %s, %s, ef_search %d: %.0f QPS, p95 %.1f ms, recall@10 %.3f, "
                    "CPU ms/query server %.2f client %.2f",
                    name,
                    label,
                    mode,
                    ef_search,
                    measured["qps"],
                    measured["ms_p95"],
                    measured["recall_at_10"],
                    measured["server_cpu_ms_per_query"],
                    measured["client_cpu_ms_per_query"],
                )
                by_mode[mode] = measured
            entry["by_ef_search"][str(ef_search)] = by_mode
        result["layouts"][label] = entry
    result["comparison"] = compare(result["layouts"])
    return result


def compare(measured: dict[str, Any]) -> dict[str, Any]:
    """Compare the layouts, coalesced, each at its smallest ef_search that reaches the recall target.

    The target compares the two layouts run the same way. One server with one request per
    query, the setup before coalescing, is reported beside it.
    """
    chosen = {}
    for label, entry in measured.items():
        for mode in (COALESCED, ONE_PER_QUERY):
            passing = [
                (int(ef), by_mode[mode])
                for ef, by_mode in entry["by_ef_search"].items()
                if by_mode[mode]["recall_at_10"] >= RECALL_TARGET
            ]
            chosen[label, mode] = min(passing, key=lambda pair: pair[0]) if passing else None
    comparison: dict[str, Any] = {"recall_target": RECALL_TARGET, "qps_target_factor": QPS_TARGET_FACTOR}
    if any(value is None for value in chosen.values()):
        comparison["target_met"] = False
        comparison["note"] = "a layout did not reach the recall target at any measured ef_search"
        return comparison
    comparison["chosen"] = {
        f"{label}, {mode}": {"ef_search": ef_search, "qps": values["qps"]}
        for (label, mode), (ef_search, values) in chosen.items()
    }
    partitioned = chosen[PARTITIONED, COALESCED][1]["qps"]
    factor = partitioned / chosen[SINGLE, COALESCED][1]["qps"]
    comparison.update(
        partitioned_over_single=factor,
        partitioned_over_single_one_per_query=partitioned / chosen[SINGLE, ONE_PER_QUERY][1]["qps"],
        target_met=factor >= QPS_TARGET_FACTOR,
    )
    return comparison


class FixedEmbedder:
    """Returns prepared vectors for query texts, so the measurement contains no model time."""

    model_name = "all-MiniLM-L6-v2"

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors
        self.dimension = next(iter(vectors.values())).shape[0]

    async def embed(self, texts):
        return np.vstack([self.vectors[text] for text in texts])


async def measure_service_cache(
    matrix: np.ndarray, arguments: argparse.Namespace, settings: VectorDbSettings, folder: Path
) -> dict[str, Any]:
    """Time KnowledgeService.query on a 4-partition knowledge base, uncached and then cached."""
    from app.core.config import DatabaseSettings, KnowledgeSettings
    from app.db.engine import Database
    from app.db.migrate import upgrade
    from app.knowledge import repository
    from app.knowledge.repository import NewDocument
    from app.knowledge.service import KnowledgeService
    from app.knowledge.store import StoredChunk

    database = Database(DatabaseSettings(url=f"sqlite:///{folder / 'service.db'}"))
    await upgrade(database)
    partitioned = settings.model_copy(update={"partitions": 4, "hnsw_ef_search": max(arguments.ef_search)})
    store = ChromaVectorStore(database, matrix.shape[1], partitioned)
    queries = make_queries(matrix, arguments.queries, arguments.query_noise, SEED + 1)
    texts = [f"question {number}" for number in range(len(queries))]
    service = KnowledgeService(
        database,
        FixedEmbedder(dict(zip(texts, queries, strict=True))),
        store,
        KnowledgeSettings(query_cache_entries=len(texts) * 2),
        Cache(MemoryBackend(len(texts) * 2), {kind: 3600 for kind in CacheKind}),
    )
    await service.create("peps", "")
    per_document = 100
    async with database.transaction() as connection:
        base = await repository.get_knowledge_base(connection, "peps")
        await repository.queue_documents(
            connection,
            base.id,
            [NewDocument(f"part-{start:05d}", "x") for start in range(0, len(matrix), per_document)],
        )
    async with database.read() as connection:
        rows = await repository.list_documents(connection, base.id, None, 10_000, None)
    for number, row in enumerate(rows):
        start = number * per_document
        items = [
            StoredChunk(
                f"{base.id[:8]}-{index}",
                index - start,
                "",
                f"chunk {index}",
                1,
                f"{index:064d}",
                matrix[index],
            )
            for index in range(start, min(start + per_document, len(matrix)))
        ]
        async with database.transaction() as connection:
            await store.write_document(connection, base.id, row.id, items)
            await repository.bump_version(connection, base.id)

    async def one_pass(expect_cached: bool) -> dict[str, float]:
        latencies: list[float] = []
        lanes = np.array_split(np.arange(len(texts)), arguments.clients)

        async def lane(indices) -> None:
            for index in indices:
                started = time.perf_counter()
                found = await service.query("peps", texts[index], TOP_K)
                latencies.append(time.perf_counter() - started)
                if found.cached != expect_cached:
                    raise RuntimeError(f"{texts[index]}: cached is {found.cached}, expected {expect_cached}")

        began = time.perf_counter()
        await asyncio.gather(*(lane(indices) for indices in lanes))
        wall = time.perf_counter() - began
        milliseconds = np.array(latencies) * 1000
        return {
            "qps": len(texts) / wall,
            "ms_p50": float(np.percentile(milliseconds, 50)),
            "ms_p95": float(np.percentile(milliseconds, 95)),
        }

    await service.query("peps", texts[0], TOP_K - 1)  # loads the layout; another top_k, so not cached
    uncached = await one_pass(expect_cached=False)
    cached = await one_pass(expect_cached=True)
    await database.dispose()
    return {
        "queries": len(texts),
        "concurrent_clients": arguments.clients,
        "layout": PARTITIONED,
        "ef_search": partitioned.hnsw_ef_search,
        "uncached": uncached,
        "cached": cached,
    }


async def run(arguments: argparse.Namespace, command: str) -> dict[str, Any]:
    settings = vector_settings(arguments.ports)
    results: dict[str, Any] = {
        "benchmark": "vector_scaling",
        "command": command,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "machine": describe_machine(),
        "source": describe_source(),
        "clients": arguments.clients,
        "processes": arguments.processes,
        "coalescing": {
            "query_batch_max": settings.query_batch_max,
            "query_requests_in_flight": settings.query_requests_in_flight,
            "query_batch_window_seconds": settings.query_batch_window_seconds,
        },
        "queries": arguments.queries,
        "query_noise": arguments.query_noise,
        "ef_search_values": arguments.ef_search,
        "data_sets": {},
    }
    data_sets = {"PEP corpus": pep_vectors(arguments.pep_vectors, max_chunks=arguments.pep_chunks)}
    results["pep_vectors"] = {
        "file": str(arguments.pep_vectors.name),
        "vectors": len(data_sets["PEP corpus"]),
    }
    if arguments.synthetic:
        data_sets["synthetic"] = synthetic_vectors(
            arguments.synthetic, data_sets["PEP corpus"].shape[1], arguments.clusters, arguments.spread, SEED
        )
        results["synthetic"] = {
            "vectors": arguments.synthetic,
            "clusters": arguments.clusters,
            "spread": arguments.spread,
        }
    with tempfile.TemporaryDirectory(prefix="bench_vector_scaling_") as folder:
        servers = start_servers(arguments.ports, Path(folder))
        try:
            for name, matrix in data_sets.items():
                results["data_sets"][name] = await measure_data_set(
                    name.split()[0].lower(), matrix, arguments, settings, servers
                )
            logger.info("service queries, uncached and cached")
            results["service_cache"] = await measure_service_cache(
                data_sets["PEP corpus"], arguments, settings, Path(folder)
            )
        finally:
            for server in servers:
                server.stop()
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    return results


def write_json(results: dict[str, Any]) -> Path:
    RESULTS_FOLDER.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromisoformat(results["started_at"]).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_FOLDER / f"vector_scaling-{stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO)
    logging.getLogger("bench.vector_corpus").setLevel(logging.INFO)
    command = "python -m bench.vector_scaling" + "".join(
        f" {part}" for part in (argv if argv is not None else sys.argv[1:])
    )
    results = asyncio.run(run(arguments, command))
    path = write_json(results)
    logger.info("results written to %s", path.relative_to(REPOSITORY_ROOT))
    if arguments.docs:
        from bench.vector_scaling_docs import write_docs

        write_docs(results)
        logger.info("docs/benchmarks.md and docs/vector_scaling.png written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
