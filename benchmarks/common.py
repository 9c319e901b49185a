"""Helpers shared by the benchmark scripts: machine facts, timing, and result files.

Every script writes ``benchmarks/results/<name>.json`` (machine, versions, date, the
settings it ran with and every measured row) and ``benchmarks/results/<name>.md`` (the
Markdown table that ``benchmarks/README.md`` quotes).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from dude_dist.distributed import child_env as proc_env  # noqa: F401  (re-exported for the benchmark scripts)
from dude_dist.distributed import free_port  # noqa: F401  (re-exported for the benchmark scripts)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(os.environ.get("DUDE_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
GSM8K_TRAIN = SHARED / "data" / "gsm8k" / "train.jsonl"

PACKAGES = ("torch", "transformers", "peft", "deepspeed", "accelerate")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
LOAD_AT_IMPORT = os.getloadavg()  # the script's start; other processes on the machine skew timings


def copy_tokenizer(folder: Path) -> None:
    """Put the stories260K tokenizer into a random-weight model's folder (ids < 512 fit any vocabulary)."""
    import shutil

    for name in TOKENIZER_FILES:
        if (STORIES / name).is_file():
            shutil.copy(STORIES / name, folder / name)


def status_bytes() -> dict[str, int]:
    """``VmRSS``, ``RssAnon``, ``RssFile`` and ``VmHWM`` (the peak) of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> None:
    """Start this process's ``VmHWM`` over from its current resident memory (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def cpu_model() -> str:
    """The CPU's marketing name (``model name`` in /proc/cpuinfo), or platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    """Installed versions of the packages the benchmarks compare, without importing them."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where and when a benchmark ran (stored in every result file)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": list(LOAD_AT_IMPORT),
        "load_average_at_end": list(os.getloadavg()),
    }
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def cpu_busy_fraction(seconds: float = 2.0) -> float:
    """Fraction of all cores busy over the next ``seconds`` (from /proc/stat; 0 if unavailable)."""
    def snapshot() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = snapshot()
        time.sleep(seconds)
        total1, idle1 = snapshot()
    except OSError:
        return 0.0
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_quiet(max_busy: float = 0.15, timeout: float = 0.0) -> float:
    """Wait up to ``timeout`` seconds for the machine to be idle (busy fraction <= ``max_busy``).

    Returns the last busy fraction seen; never raises (a busy machine is reported, not refused).
    """
    deadline = time.monotonic() + timeout
    busy = cpu_busy_fraction(1.0)
    while busy > max_busy and time.monotonic() < deadline:
        print(f"machine {busy:.0%} busy; waiting for it to be quieter ...", flush=True)
        busy = cpu_busy_fraction(5.0)
    return busy


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_once(fn: Callable[[], Any], sync: Callable[[], None] | None = None, clock: str = "wall") -> float:
    """Seconds of one ``fn()`` call on ``clock`` (``sync`` waits for a GPU to finish).

    ``wall`` is elapsed time. ``cpu`` is this process's CPU time: with one torch thread it
    is the elapsed time the call would take on an idle core, and it does not grow when
    other processes take the core away, so it is the steadier measure on a shared machine.
    """
    sync = sync or (lambda: None)
    now = CLOCKS[clock]
    sync()
    t0 = now()
    fn()
    sync()
    return now() - t0


def median_seconds(fn: Callable[[], Any], *, repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None,
                   clock: str = "wall") -> tuple[float, list[float]]:
    """Median time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = [time_once(fn, sync, clock) for _ in range(repeats)]
    return statistics.median(times), times


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` significant figures, None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 10 ** digits:
            return f"{value:.0f}"
        if abs(value) < 10 ** -(digits - 1):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells go through :func:`fmt`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    return "\n".join(lines)


def mib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**20


def write_results(name: str, *, title: str, settings: dict[str, Any], tables: dict[str, tuple[list[str], list[list]]],
                  records: Any, notes: Sequence[str] = (), device: str = "cpu") -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and ``results/<name>.md``; print the Markdown.

    Args:
        name: file stem.
        title: heading of the Markdown file.
        settings: what the run was asked to do (sizes, threads, repeats...).
        tables: caption -> (columns, rows) for the Markdown file.
        records: the raw measurements (JSON-serialisable) for the JSON file.
        notes: lines printed under the tables (goals, caveats).
        device: ``cpu`` or ``cuda[:i]`` (adds the GPU name to the machine record).
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = machine_info(device)
    payload = {"benchmark": name, "machine": machine, "settings": settings, "results": records,
               "notes": list(notes)}
    json_path = RESULTS / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    v = machine["versions"]
    parts = [f"### {title}", "",
             f"{machine['date']} · {machine['cpu']} ({machine['cores']} cores)"
             + (f" · {machine['gpu']}" if "gpu" in machine else "")
             + f" · 1-min load average {machine['load_average_at_start'][0]:.2f} at start, "
             f"{machine['load_average_at_end'][0]:.2f} at end · "
             + ", ".join(f"{k} {val}" for k, val in v.items() if val), ""]
    for caption, (columns, rows) in tables.items():
        if caption:
            parts += [f"**{caption}**", ""]
        parts += [markdown_table(columns, rows), ""]
    if notes:
        parts += [f"- {n}" for n in notes] + [""]
    md_path = RESULTS / f"{name}.md"
    md_path.write_text("\n".join(parts))
    print("\n".join(parts))
    shown = [os.path.relpath(path, ROOT) if path.is_relative_to(ROOT) else str(path) for path in (json_path, md_path)]
    print(f"wrote {shown[0]} and {shown[1]}")
    if update_readme(name):
        print(f"updated the results/{name}.md block of benchmarks/README.md")
    return json_path, md_path


def update_readme(name: str) -> bool:
    """Paste ``results/<name>.md`` between its BEGIN/END markers in benchmarks/README.md, if it has them."""
    readme = Path(__file__).resolve().parent / "README.md"
    begin, end = f"<!-- BEGIN results/{name}.md -->", f"<!-- END results/{name}.md -->"
    if not readme.is_file():
        return False
    text = readme.read_text()
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    table = (RESULTS / f"{name}.md").read_text().strip()
    readme.write_text(f"{head}{begin}\n{table}\n{end}{tail}")
    return True


def torchrun_cmd(nproc: int) -> list[str]:
    """``torchrun`` from this interpreter's environment, on a free loopback port."""
    from sys import executable

    return [str(Path(executable).parent / "torchrun"), "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port())]
