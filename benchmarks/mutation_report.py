"""Per-module mutation scores from mutmut's results in ``mutants/`` (run by ``make mutation``).

mutmut prints one total; the README records one row per core module, so this reads mutmut's
per-file results (``mutants/<path>.meta``) for every file that ``[tool.mutmut] only_mutate`` in
pyproject.toml selects and prints the table. A mutant counts as killed when a test failed or timed
out (an infinite loop is a detected bug); the score is killed / checked. ``--names survived`` lists
mutant names instead, for rerunning them (``make mutation`` does, so that tests added since the last
run get their chance) or for ``mutmut show NAME``; with ``--sample N`` it picks N of them per module
uniformly at random (seeded), so that a module too slow to check in full can be scored on a sample.
For a partially checked module the report adds the 95% Wilson interval of its score, which bounds
the full score only when the checked mutants are such a random sample (mutmut's own order is
cheapest first, which is not).
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import math
import random
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


def wilson_interval(killed: int, checked: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a proportion: sound for small samples and scores near 100%."""
    share = killed / checked
    centre = (share + z * z / (2 * checked)) / (1 + z * z / checked)
    half = z * math.sqrt(share * (1 - share) / checked + z * z / (4 * checked * checked)) / (1 + z * z / checked)
    return max(0.0, centre - half), min(1.0, centre + half)


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
    parser.add_argument("--sample", type=int, metavar="N", help="with --names: at most N per module, chosen at random")
    parser.add_argument("--seed", type=int, default=0, help="the seed of --sample's choice (default 0)")
    parser.add_argument("--min-score", type=float, default=0.9, help="the goal per module (default 0.9)")
    args = parser.parse_args(argv)
    root = Path.cwd()
    if not (root / "mutants").is_dir():
        print("no mutants/ folder here: run `make mutation` (mutmut run) from the repository root first")
        return 2
    if args.names:
        chooser = random.Random(args.seed)
        for path in mutated_files(root):
            names = sorted(name for name, status in load(path).items() if status == args.names)
            if args.sample is not None and len(names) > args.sample:
                names = sorted(chooser.sample(names, args.sample))
            for name in names:
                print(name)
        return 0
    rows = scores(root)
    print(table(rows, f"{datetime.date.today().isoformat()} / {commit(root)}"))
    other = sorted({status for row in rows for status in row.statuses} - {*KILLED, "survived", "not checked"})
    for status in other:
        print(f"{status}: " + ", ".join(f"{row.path} {row.statuses[status]}" for row in rows if row.statuses[status]))
    for row in rows:
        if row.checked and row.statuses["not checked"]:
            low, high = wilson_interval(row.killed, row.checked)
            print(
                f"partial: {row.path} {row.checked} of {row.total} checked, {percent(row.score)}; "
                f"95% interval {percent(low)} to {percent(high)} if those are a random sample"
            )
    below = [row.path for row in rows if row.score is not None and row.score < args.min_score]
    if below:
        print(f"below {percent(args.min_score)}: {', '.join(below)}")
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
