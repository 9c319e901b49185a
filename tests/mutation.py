"""Mutation testing of the core and state modules against the fast unit tests (``make mutation``).

    python tests/mutation.py                                   # every module of [tool.mutmut] only_mutate
    python tests/mutation.py --modules dude svd_init sampler   # some of them
    python tests/mutation.py --report-only                     # rewrite the report from the last run

mutmut (``pip install -e '.[mutation]'``; config: ``[tool.mutmut]`` in pyproject.toml) runs in a
scratch copy of the project (``.mutation/``, git-ignored), so the working tree is never
changed and a run sees one snapshot of the code. Each mutant runs the unit tests that cover
the mutated function (``-m 'not slow'``). The report, ``tests/MUTATION.md``, gets the score per
module and the diff of every mutant that survived; its section "Survivors explained" is
written by hand and kept across runs. Slow (tens of minutes on 2 cores): not part of CI.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / ".mutation"
REPORT = ROOT / "tests" / "MUTATION.md"
SHARED = Path(os.environ.get("DUDE_SHARED", ROOT.parent / "shared")).resolve()
COPY = ("dude_dist", "tests", "launch", "configs", "pyproject.toml")
KEPT_HEADING = "## Survivors explained"
# mutmut's exit-code meaning (mutmut/stats.py); a timeout counts as killed.
KILLED = {"killed", "timeout", "caught by type check", "segfault"}


def mutmut() -> str:
    return str(Path(sys.executable).parent / "mutmut")


def modules_from_config() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.mutmut]", 1)[1].split("\n[", 1)[0]
    only = re.search(r"only_mutate\s*=\s*\[(.*?)\]", section, re.S)
    return [Path(p).stem for p in re.findall(r'"([^"]+)"', only.group(1))] if only else []


def prepare() -> None:
    """A fresh scratch copy with ``shared`` beside the tests' working directory (``mutants/``)."""
    if SCRATCH.exists():
        shutil.rmtree(SCRATCH)
    SCRATCH.mkdir()
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, SCRATCH / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, SCRATCH / name)
    (SCRATCH / "shared").symlink_to(SHARED)  # ../shared as seen from .mutation/mutants


def run(modules: list[str], max_children: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CI": "",
           "DUDE_SHARED": str(SHARED), "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    patterns = [f"dude_dist.{m}.*" for m in modules]
    subprocess.run([mutmut(), "run", "--max-children", str(max_children), *patterns], cwd=SCRATCH, env=env,
                   check=True)


def results() -> dict[str, str]:
    """Mutant name -> status, from ``mutmut results --all true``."""
    out = subprocess.run([mutmut(), "results", "--all", "true"], cwd=SCRATCH, capture_output=True, text=True,
                         check=True).stdout
    found = {}
    for line in out.splitlines():
        name, sep, status = line.strip().partition(": ")
        if sep:
            found[name] = status
    return found


def diff(name: str) -> str:
    out = subprocess.run([mutmut(), "show", name], cwd=SCRATCH, capture_output=True, text=True).stdout
    lines = [line for line in out.splitlines()[1:] if not line.startswith(("---", "+++"))]
    return "\n".join(lines).strip()


def _earlier(text: str, modules: list[str]) -> tuple[list[tuple[str, int, int]], list[str]]:
    """From an existing report, the table rows ``(row, mutants, killed)`` and the survivor
    sections of the modules that this run did not mutate, so one report covers them all."""
    rows = []
    for line in text.splitlines():
        found = re.match(r"\| `dude_dist/(\w+)\.py` \| (\d+) \| (\d+) \|", line)
        if found and found.group(1) not in modules:
            rows.append((line, int(found.group(2)), int(found.group(3))))
    body = text.split("## Surviving mutants", 1)[1].split(KEPT_HEADING, 1)[0] if "## Surviving mutants" in text else ""
    sections = [part for part in re.split(r"(?m)^(?=### )", body)
                if (m := re.match(r"### `dude_dist\.(\w+)\.", part)) and m.group(1) not in modules]
    return rows, sections


def write_report(modules: list[str], status: dict[str, str]) -> str:
    kept = ""
    old = REPORT.read_text() if REPORT.is_file() else ""
    if KEPT_HEADING in old:
        kept = old.split(KEPT_HEADING, 1)[1]
    earlier_rows, earlier_sections = _earlier(old, modules)
    rows, survivors = [], []
    total_all = sum(n for _, n, _ in earlier_rows)
    killed_all = sum(k for _, _, k in earlier_rows)
    for module in modules:
        mine = {n: s for n, s in status.items() if n.startswith(f"dude_dist.{module}.")}
        killed = sum(s in KILLED for s in mine.values())
        total_all, killed_all = total_all + len(mine), killed_all + killed
        score = f"{100 * killed / len(mine):.1f}%" if mine else "n/a"
        counts = {s: sum(v == s for v in mine.values()) for s in sorted(set(mine.values()))}
        rows.append(f"| `dude_dist/{module}.py` | {len(mine)} | {killed} | {score} | "
                    + ", ".join(f"{s}: {c}" for s, c in counts.items() if s not in KILLED) + " |")
        survivors += [(n, s) for n, s in sorted(mine.items()) if s not in KILLED]
    total_score = f"{100 * killed_all / total_all:.1f}%" if total_all else "n/a"
    lines = [
        "# Mutation testing",
        "",
        "Generated by `make mutation` (`tests/mutation.py`: mutmut, config in `pyproject.toml`) on "
        f"{datetime.date.today().isoformat()} (rows of modules not mutated in this run, and their survivors, "
        "are kept from the previous report). Every mutant runs the fast unit tests that cover the mutated "
        "function (the test files in `[tool.mutmut]`, `-m 'not slow'`, without the timing test and the trainer subprocess "
        "tests); a mutant is killed when a test fails or times out.",
        "",
        "| module | mutants | killed | score | not killed |",
        "|---|---|---|---|---|",
        *[row for row, _, _ in earlier_rows],
        *rows,
        f"| **all** | {total_all} | {killed_all} | **{total_score}** | |",
        "",
        "## Surviving mutants",
        "",
    ]
    if not survivors and not earlier_sections:
        lines.append("None.")
    lines += [part.rstrip() + "\n" for part in earlier_sections]
    for name, state in survivors:
        lines += [f"### `{name}` ({state})", "", "```diff", diff(name), "```", ""]
    lines += ["", KEPT_HEADING + (kept.rstrip() + "\n" if kept else "\n\n(none yet)\n")]
    REPORT.write_text("\n".join(lines))
    return total_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", nargs="+", default=None, help="module stems (default: all of only_mutate)")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the last run")
    args = parser.parse_args()
    modules = args.modules or modules_from_config()
    if not args.report_only:
        prepare()
        run(modules, args.max_children)
    score = write_report(modules, results())
    print(f"mutation score {score}; report: {REPORT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
