"""Where an export's time goes: each progress stage timed as it runs, and the process's peak memory.

The pipeline already names its stages through the progress callback ("executorch: lower: ...",
"check: onnx"); StageClock sits in front of that callback, so what the user watches and what the
manifest records are the same stages. Repeated stages ("calibrate: gptq layer 3/24") are summed
under one name.
"""
from __future__ import annotations

import re
import time
from typing import Any

from cpm_mobile.exporter.targets.base import Progress, no_progress

_COUNTER = re.compile(r"\s+\d+/\d+$")  # "gptq layer 3/24" -> "gptq layer"
_DONE = re.compile(r"(^|: )done$")


class StageClock:
    """A progress callback that also times each stage (the time until the next stage starts)."""

    def __init__(self, progress: Progress = no_progress) -> None:
        self._progress = progress
        self._started = time.perf_counter()
        self._current: tuple[str, float] | None = None
        self._seconds: dict[str, float] = {}
        self._peak_after: dict[str, float] = {}  # the process's peak memory when the stage ended: where it rose

    def __call__(self, description: str, fraction: float | None = None) -> None:
        stage = _COUNTER.sub("", description)
        if self._current is None or self._current[0] != stage:
            now = time.perf_counter()
            self._close(now)
            if not _DONE.search(stage):
                self._current = (stage, now)
        self._progress(description, fraction)

    def _close(self, now: float) -> None:
        if self._current is not None:
            stage, started = self._current
            self._seconds[stage] = self._seconds.get(stage, 0.0) + now - started
            self._peak_after[stage] = _peak_mib()
            self._current = None

    def cost(self) -> dict[str, Any]:
        """The manifest's `export_cost`: total seconds, peak resident memory, and the stages in order."""
        now = time.perf_counter()
        self._close(now)
        return {
            "seconds": round(now - self._started, 2),
            "peak_rss_mib": round(_peak_mib(), 1),
            "stages": [{"stage": stage, "seconds": round(seconds, 2), "peak_rss_mib": round(self._peak_after[stage], 1)}
                       for stage, seconds in self._seconds.items()],
        }


def _peak_mib() -> float:
    from cpm_mobile.exporter.generate import peak_memory_mib

    return peak_memory_mib()


def cost_lines(cost: dict[str, Any]) -> list[str]:
    """The stages as `--verbose` prints them: seconds, share of the total, the process's peak memory when the
    stage ended (it rises in the stages that hold the most), name."""
    total = max(cost["seconds"], 1e-9)
    lines = [f"{entry['seconds']:8.1f} s {100 * entry['seconds'] / total:5.1f} %  peak {entry['peak_rss_mib']:6.0f} MiB  "
             f"{entry['stage']}" for entry in cost["stages"] if entry["seconds"] >= 0.05]
    lines.append(f"{cost['seconds']:8.1f} s total, peak resident memory {cost['peak_rss_mib']:.0f} MiB")
    return lines
