"""`python -m benchmarks.mutation_report` reads mutmut's per-file results into the README's table.

The fixtures are hand-written ``mutants/<path>.meta`` files in mutmut's format (exit code per
mutant), so each expected row, sample and interval is known by construction.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import mutation_report

PYPROJECT = """
[tool.mutmut]
source_paths = ["pkg"]
only_mutate = ["pkg/b.py", "pkg/*.py"]
do_not_mutate = ["pkg/skip.py"]
"""


def write_results(root: Path, path: str, exit_codes: dict[str, int | None]) -> None:
    meta = root / "mutants" / f"{path}.meta"
    meta.parent.mkdir(parents=True, exist_ok=True)
    # The keys mutmut 3.8 writes and insists on reading back.
    meta.write_text(
        json.dumps({"exit_code_by_key": exit_codes, "durations_by_key": {}, "estimated_durations_by_key": {}})
    )


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two mutated modules: ``a`` fully checked (3 of 4 killed), ``b`` with 10 of 30 checked, all killed."""
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    for name in ("a", "b", "skip"):
        (tmp_path / "pkg").mkdir(exist_ok=True)
        (tmp_path / "pkg" / f"{name}.py").write_text("x = 1\n")
    # 1 killed, 36 timeout, 37 caught by the type checker: all three count as killed; 0 survived.
    write_results(
        tmp_path,
        "pkg/a.py",
        {"pkg.a.x_f__mutmut_1": 1, "pkg.a.x_f__mutmut_2": 36, "pkg.a.x_f__mutmut_3": 37, "pkg.a.x_f__mutmut_4": 0},
    )
    write_results(tmp_path, "pkg/b.py", {f"pkg.b.x_g__mutmut_{i}": (1 if i <= 10 else None) for i in range(1, 31)})
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_table_has_one_row_per_module_in_only_mutate_order_and_a_total(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mutation_report.main([]) == 1  # a is at 75%, under the 90% goal
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| `pkg/b.py` | 30 | 10 | 0 | 20 | 100.0% |")
    assert lines[3].startswith("| `pkg/a.py` | 4 | 3 | 1 | 0 | 75.0% |")
    assert lines[4].startswith("| **total** | 34 | 13 | 1 | 20 | 92.9% |")  # 13 / 14 checked
    assert not any("skip.py" in line for line in lines)
    assert lines[-1] == "below 90.0%: pkg/a.py"


def test_a_partial_module_gets_the_wilson_interval_of_its_score(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mutation_report.main([])
    partial = [line for line in capsys.readouterr().out.splitlines() if line.startswith("partial:")]
    # 10 of 10: the Wilson interval's lower end is n / (n + z^2) = 10 / 13.8416 = 72.2%.
    assert partial == [
        "partial: pkg/b.py 10 of 30 checked, 100.0%; 95% interval 72.2% to 100.0% if those are a random sample"
    ]


@pytest.mark.parametrize(
    ("killed", "checked", "low", "high"),
    [
        (0, 10, 0.0, 0.2775),  # z^2 / (n + z^2) = 3.8416 / 13.8416
        (5, 10, 0.2366, 0.7634),  # the textbook case, symmetric about 1/2
        (90, 100, 0.8256, 0.9448),
    ],
)
def test_wilson_interval_matches_the_closed_form(killed: int, checked: int, low: float, high: float) -> None:
    assert mutation_report.wilson_interval(killed, checked) == pytest.approx((low, high), abs=1e-4)


def test_names_lists_every_mutant_of_a_status(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mutation_report.main(["--names", "survived"]) == 0
    assert capsys.readouterr().out.split() == ["pkg.a.x_f__mutmut_4"]


def test_a_sample_is_that_many_distinct_names_per_module_and_repeats_with_its_seed(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unchecked = {f"pkg.b.x_g__mutmut_{i}" for i in range(11, 31)}
    samples = []
    for seed in (3, 3, 4):
        mutation_report.main(["--names", "not checked", "--sample", "5", "--seed", str(seed)])
        samples.append(capsys.readouterr().out.split())
    assert len(samples[0]) == len(set(samples[0])) == 5
    assert set(samples[0]) <= unchecked
    assert samples[0] == samples[1]
    assert samples[0] != samples[2]
    # A sample larger than the list is the list; statuses are mutmut's, so "killed" leaves out a timeout.
    mutation_report.main(["--names", "killed", "--sample", "50"])
    assert len(capsys.readouterr().out.split()) == 11


def test_without_results_it_says_how_to_make_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert mutation_report.main([]) == 2
    assert "make mutation" in capsys.readouterr().out
