"""Per-module mutation scores from mutmut's results in ``mutants/`` (run by ``make mutation``).

mutmut prints one total; the README records one row per core module, so this reads mutmut's
per-file results (``mutants/<path>.meta``) for every file that ``[tool.mutmut] only_mutate`` in
pyproject.toml selects and prints the table. A mutant counts as killed when a test failed or timed
out (an infinite loop is a detected bug); the score is killed / checked. ``--names survived`` lists
mutant names instead, for rerunning them (``make mutation`` does, so that tests added since the last
run get their chance) or for ``mutmut show NAME``.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import subprocess
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mutmut.mutation.data import SourceFileMutationData
from mutmut.stats import status_by_exit_code

KILLED = ("killed", "timeout", "caught by type check")


@dataclass(frozen=True)
class ModuleScore:
    path: str
    statuses: Counter[str]

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def killed(self) -> int:
        return sum(self.statuses[name] for name in KILLED)

    @property
    def checked(self) -> int:
        return self.total - self.statuses["not checked"]

    @property
    def score(self) -> float | None:
        return self.killed / self.checked if self.checked else None


def mutated_files(root: Path) -> list[str]:
    """The source files ``[tool.mutmut]`` mutates, in the order of its ``only_mutate`` globs."""
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mutmut"]
    sources = sorted(
        path.relative_to(root).as_posix()
        for source in config["source_paths"]
        for path in (root / source).rglob("*.py")
        if "__pycache__" not in path.parts
    )
    ordered: list[str] = []
    for pattern in config["only_mutate"]:
        ordered += [path for path in sources if fnmatch.fnmatch(path, pattern) and path not in ordered]
    return [path for path in ordered if not any(fnmatch.fnmatch(path, p) for p in config.get("do_not_mutate", []))]


def load(path: str) -> dict[str, str]:
    """Mutant name -> status for one source file (empty when mutmut has not generated its mutants)."""
    data = SourceFileMutationData(path=path)
    data.load()
    return {name: status_by_exit_code[code] for name, code in data.exit_code_by_key.items()}


def scores(root: Path) -> list[ModuleScore]:
    return [ModuleScore(path, Counter(load(path).values())) for path in mutated_files(root)]


def commit(root: Path) -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def table(rows: list[ModuleScore], stamp: str) -> str:
    """The README's Markdown table: one row per module, then the total."""
    lines = [
        "| module | mutants | killed | survived | not checked | score | date / commit |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| `{row.path}` | {row.total} | {row.killed} | {row.statuses['survived']} | "
            f"{row.statuses['not checked']} | {percent(row.score)} | {stamp} |"
        )
    total = ModuleScore("total", sum((row.statuses for row in rows), Counter()))
    lines.append(
        f"| **total** | {total.total} | {total.killed} | {total.statuses['survived']} | "
        f"{total.statuses['not checked']} | {percent(total.score)} | {stamp} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", metavar="STATUS", help="print the names of the mutants with this status")
    parser.add_argument("--min-score", type=float, default=0.9, help="the goal per module (default 0.9)")
    args = parser.parse_args(argv)
    root = Path.cwd()
    if not (root / "mutants").is_dir():
        print("no mutants/ folder here: run `make mutation` (mutmut run) from the repository root first")
        return 2
    if args.names:
        for path in mutated_files(root):
            for name, status in sorted(load(path).items()):
                if status == args.names:
                    print(name)
        return 0
    rows = scores(root)
    print(table(rows, f"{datetime.date.today().isoformat()} / {commit(root)}"))
    other = sorted({status for row in rows for status in row.statuses} - {*KILLED, "survived", "not checked"})
    for status in other:
        print(f"{status}: " + ", ".join(f"{row.path} {row.statuses[status]}" for row in rows if row.statuses[status]))
    below = [row.path for row in rows if row.score is not None and row.score < args.min_score]
    if below:
        print(f"below {percent(args.min_score)}: {', '.join(below)}")
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
