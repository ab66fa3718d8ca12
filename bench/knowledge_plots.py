"""The two plots of the knowledge_bases section of docs/benchmarks.md, drawn from one run's results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STORE_LABEL = "EmbeddedVectorStore.search"
CHROMA_LABEL = "Chroma embedded (PersistentClient)"


def plot_embedding(results: dict[str, Any], path: Path) -> None:
    """Save a bar chart of chunks per second for every embedding configuration, with the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    embedding = results["embedding"]
    configurations = embedding["configurations"]
    summary = embedding["summary"]
    labels = [entry["label"] for entry in configurations]
    rates = [entry["chunks_per_second"] for entry in configurations]
    errors = [
        [rate - entry["chunks_per_second_min"] for rate, entry in zip(rates, configurations, strict=True)],
        [entry["chunks_per_second_max"] - rate for rate, entry in zip(rates, configurations, strict=True)],
    ]
    colors = ["tab:blue" if entry["kind"] == "project" else "tab:gray" for entry in configurations]

    figure, axes = plt.subplots(figsize=(9, 4.5))
    bars = axes.barh(labels, rates, xerr=errors, color=colors, capsize=3)
    axes.bar_label(bars, labels=[f"{rate:.1f}" for rate in rates], padding=6, fontsize=8)
    axes.invert_yaxis()
    target = summary["target_factor"] * summary["best_encode_chunks_per_second"]
    axes.axvline(
        target,
        color="tab:red",
        linestyle="--",
        linewidth=1,
        label=f"target: {summary['target_factor']:g} × best encode() = {target:.1f}",
    )
    axes.set_xlim(0, max(rates) * 1.25)
    axes.set_xlabel(f"chunks per second, {embedding['sample_chunks']:,} PEP chunks (higher is better)")
    axes.set_title(
        "all-MiniLM-L6-v2 on the CPU: project's LocalEmbedder (blue), SentenceTransformer.encode() (gray)",
        fontsize=9,
    )
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_search(results: dict[str, Any], path: Path) -> None:
    """Save queries per second against recall@10, with the HNSW sweep as a line, and latency bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    search = results["search"]
    systems = search["systems"]
    summary = search["summary"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})

    sweep = [entry for entry in systems if entry["kind"] == "hnsw_sweep"]
    left.plot(
        [entry["recall"] for entry in sweep],
        [entry["qps"] for entry in sweep],
        "o-",
        color="tab:green",
        markersize=4,
        label="FAISS HNSW, efSearch sweep",
    )
    for entry in sweep:
        left.annotate(
            str(entry["ef_search"]),
            (entry["recall"], entry["qps"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    markers = {
        STORE_LABEL: ("tab:blue", "s"),
        CHROMA_LABEL: ("tab:orange", "D"),
        "numpy exact": ("tab:gray", "^"),
        "FAISS IndexFlatIP": ("tab:purple", "v"),
    }
    for entry in systems:
        if entry["label"] in markers:
            color, marker = markers[entry["label"]]
            left.scatter(
                entry["recall"],
                entry["qps"],
                color=color,
                marker=marker,
                s=60,
                label=entry["label"],
                zorder=3,
            )
    target_qps = summary["target_factor"] * summary["chroma_qps"]
    left.axhline(
        target_qps,
        color="tab:red",
        linestyle="--",
        linewidth=1,
        label=f"target: {summary['target_factor']:g} × Chroma QPS = {target_qps:,.0f}",
    )
    left.axvline(
        summary["recall_target"],
        color="tab:red",
        linestyle=":",
        linewidth=1,
        label=f"recall target {summary['recall_target']:g}",
    )
    left.set_yscale("log")
    left.set_xlabel("recall@10 against exact search")
    left.set_ylabel("queries per second, one client (log scale)")
    left.set_title(f"Single-query search over {search['vectors']:,} PEP chunk vectors", fontsize=10)
    left.legend(fontsize=7, loc="lower left")

    displayed_systems = [
        entry
        for entry in systems
        if entry["kind"] != "hnsw_sweep" or entry["label"] == summary["hnsw_chosen_label"]
    ]
    labels = [
        entry["label"].replace(" (PersistentClient)", "").replace(", efSearch", "\nefSearch")
        for entry in displayed_systems
    ]
    positions = range(len(displayed_systems))
    width = 0.4
    right.bar(
        [p - width / 2 for p in positions],
        [entry["latency_ms_p50"] for entry in displayed_systems],
        width,
        label="p50",
        color="tab:blue",
    )
    right.bar(
        [p + width / 2 for p in positions],
        [entry["latency_ms_p95"] for entry in displayed_systems],
        width,
        label="p95",
        color="tab:cyan",
    )
    right.set_xticks(list(positions), labels, fontsize=7, rotation=20, ha="right")
    right.set_yscale("log")
    right.set_ylabel("latency per query, ms (log scale)")
    right.set_title("Single-query latency", fontsize=10)
    right.legend(fontsize=8)

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
