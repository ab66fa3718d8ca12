"""The machine and checkout behind a knowledge-base benchmark run, and the CPU load of other processes.

A run on a shared host competes with whatever else runs there. ``CpuUsage`` measures, per
phase, how many CPU-seconds all other processes took, from /proc/stat minus this process's
own CPU time, so a reader can tell a quiet run from a disturbed one.
"""

from __future__ import annotations

import os
import platform
import re
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "torch",
    "sentence-transformers",
    "transformers",
    "tokenizers",
    "numpy",
    "faiss-cpu",
    "chromadb",
    "sqlalchemy",
    "aiosqlite",
    "threadpoolctl",
    "matplotlib",
)


def describe_machine() -> dict[str, Any]:
    """Return the CPU count and model, RAM, thread pools and software versions of this host."""
    import torch
    from threadpoolctl import threadpool_info

    cpuinfo = _read_proc("cpuinfo")
    meminfo = _read_proc("meminfo")
    cpu_model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    memory = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.MULTILINE)
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model.group(1).strip() if cpu_model else "unknown",
        "memory_gib": round(int(memory.group(1)) / 1024**2, 1) if memory else None,
        "torch_threads": torch.get_num_threads(),
        "thread_pools": [
            {
                "api": pool["internal_api"],
                "threads": pool["num_threads"],
                "library": Path(pool["filepath"]).name,
            }
            for pool in threadpool_info()
        ],
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "packages": packages,
    }


def _read_proc(name: str) -> str:
    path = Path("/proc") / name
    return path.read_text(encoding="utf-8") if path.exists() else ""


def describe_source() -> dict[str, Any]:
    """Return the checked-out commit and whether app/ differs from it, or None for both where git fails.

    Only read-only git commands run, with optional locks off so that git does not refresh the index.
    """
    environment = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *arguments], cwd=REPOSITORY_ROOT, capture_output=True, text=True, env=environment
        )

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("diff", "--quiet", "HEAD", "--", "app")
    except OSError:
        return {"commit": None, "app_has_uncommitted_changes": None}
    if commit.returncode != 0 or changed.returncode not in (0, 1):
        return {"commit": None, "app_has_uncommitted_changes": None}
    return {"commit": commit.stdout.strip(), "app_has_uncommitted_changes": changed.returncode == 1}


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    wall: float
    busy_seconds: float  # of all CPUs, from /proc/stat
    own_seconds: float  # of this process and its waited-for children


class CpuUsage:
    """Recorder of the CPU time that other processes used during each named phase of a run."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self._ticks_per_second = os.sysconf("SC_CLK_TCK")
        self._cpus = len(os.sched_getaffinity(0))

    def snapshot(self) -> CpuSnapshot:
        fields = _read_proc("stat").split("\n", 1)[0].split()[1:]
        # user nice system idle iowait irq softirq steal; idle and iowait are not busy time.
        values = [int(value) for value in fields[:8]] if fields else [0] * 8
        busy = sum(values) - values[3] - values[4]
        times = os.times()
        return CpuSnapshot(
            wall=time.perf_counter(),
            busy_seconds=busy / self._ticks_per_second,
            own_seconds=times.user + times.system + times.children_user + times.children_system,
        )

    def record(self, phase: str, since: CpuSnapshot) -> None:
        now = self.snapshot()
        wall = now.wall - since.wall
        others = max(0.0, (now.busy_seconds - since.busy_seconds) - (now.own_seconds - since.own_seconds))
        self.phases[phase] = {
            "wall_seconds": wall,
            "other_processes_cpu_seconds": others,
            "other_processes_share_of_cpus": others / (wall * self._cpus) if wall > 0 else 0.0,
        }
