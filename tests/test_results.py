"""The reports in docs/results/ are built from their records by `lora-diffusion results`:
regenerating one from the same record changes nothing but its generation date, a report whose
record is not here is left as it is, every report is headed by its command, date, machine,
commit and protocol, and every link in README.md and docs/results/ reaches a file."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from lora_diffusion.cli import main as cli_main
from lora_diffusion.experiments import results

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "results"
REPORTS = REPO / "docs" / "results"
GENERATED_AT = re.compile(r"(?<=^" + re.escape(results.GENERATED) + r" on )\d{4}-\d\d-\d\d \d\d:\d\d UTC", re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def dates_masked(text: str) -> str:
    return GENERATED_AT.sub("<date>", text)


def context(repo: Path) -> results.Context:
    # no store here: a grid or comparison spec must find its record absent, never create one
    return results.Context(repo, "sqlite:////nonexistent/mlflow.db", "/nonexistent/sweeps")


def test_a_soak_report_built_from_its_fixture_record_is_the_stored_one_but_for_the_date(tmp_path):
    report = tmp_path / "soak.md"
    shutil.copy(FIXTURES / "soak.spec.md", report)
    assert results.rebuild(report, context(FIXTURES), "2030-01-02 03:04 UTC") == "rebuilt soak.md"
    built = report.read_text()
    assert "on 2030-01-02 03:04 UTC from" in built
    assert dates_masked(built) == dates_masked((FIXTURES / "soak.expected.md").read_text())
    # built again later: only the date moves
    results.rebuild(report, context(FIXTURES), "2031-05-06 07:08 UTC")
    assert report.read_text() != built
    assert dates_masked(report.read_text()) == dates_masked(built)


def test_the_benchmark_report_and_readme_table_regenerate_from_bench_json_unchanged_but_for_dates(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs" / "bench", docs / "bench")
    (docs / "results").mkdir()
    report = docs / "results" / "benchmark.md"
    shutil.copy(REPORTS / "benchmark.md", report)
    assert results.rebuild(report, context(tmp_path), "2030-01-02 03:04 UTC") == "rebuilt benchmark.md"
    assert dates_masked(report.read_text()) == dates_masked((REPORTS / "benchmark.md").read_text())
    readme = (REPO / "README.md").read_text()
    assert results.into_markers(readme, results.performance_block(context(REPO))) == readme


def test_a_report_whose_record_is_absent_or_not_kept_is_left_as_it_is(tmp_path):
    absent = tmp_path / "grid.md"
    absent.write_text('<!-- results {"kind": "grid", "title": "t", "sweep": "gone", "command": "c", '
                      '"protocol": "p"} -->\nby hand\n')
    moved = tmp_path / "moved.md"
    moved.write_text('<!-- results {"kind": "estimate", "title": "t", "records_kept": false} -->\nby hand\n')
    assert "not regenerable here (no MLflow store" in results.rebuild(absent, context(tmp_path), "now")
    assert results.NOT_KEPT in results.rebuild(moved, context(tmp_path), "now")
    assert absent.read_text().endswith("by hand\n") and moved.read_text().endswith("by hand\n")


def test_a_spec_line_of_an_unknown_kind_is_one_error_naming_the_field(tmp_path):
    bad = tmp_path / "bad.md"
    bad.write_text('<!-- results {"kind": "nonsense", "title": "t"} -->\n')
    with pytest.raises(results.UserError, match="^kind: "):
        results.read_spec(bad)


def test_results_verb_refuses_an_unknown_report_with_one_line(capsys):
    assert cli_main(["results", "--only", "no-such-report", "--performance", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: only: no report 'no-such-report'")


def test_every_report_is_headed_by_command_date_machine_commit_and_protocol():
    reports = sorted(REPORTS.glob("*.md"))
    assert len(reports) > 10
    for path in reports:
        if path.name == "findings.md":
            continue
        text = path.read_text()
        spec = results.read_spec(path)
        for field in ("Command that produced the record", "Measured", "Machine", "Commit", "Protocol"):
            assert f"\n- {field}: " in text, f"{path.name}: no {field} line"
        generated = text.count("<!-- results:begin") == 1 and text.count("<!-- results:end -->") == 1
        moved = spec.get("records_kept") is False and results.NOT_KEPT in text
        assert generated or moved, f"{path.name}: neither generated between markers nor marked not regenerable"


def test_findings_are_dated_and_link_to_the_reports():
    text = (REPORTS / "findings.md").read_text()
    assert re.search(r"\b2026-12-\d\d\b", text)
    linked = {m for m in LINK.findall(text) if m.endswith(".md")}
    assert {p.name for p in REPORTS.glob("*.md")} - {"findings.md"} <= linked


def links(path: Path) -> list[str]:
    """The relative link targets of a markdown file (web addresses and in-page anchors left out)."""
    return [m.split("#")[0] for m in LINK.findall(path.read_text())
            if not re.match(r"[a-z]+://|mailto:|#", m)]


def test_every_link_in_readme_and_docs_results_resolves_to_a_file():
    broken = [f"{path.relative_to(REPO)} -> {target}"
              for path in [REPO / "README.md", *sorted(REPORTS.glob("*.md"))]
              for target in links(path) if not (path.parent / target).exists()]
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def test_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("")
    page.write_text("[ok](there.md) [anchor](#x) [web](https://example.org) [gone](missing.png#top)")
    assert [t for t in links(page) if not (tmp_path / t).exists()] == ["missing.png"]


def _logged_grid(uri: str, sweep: str) -> None:
    """A 2-cell x 2-seed grid's trials in MLflow, as the engine logs them."""
    from lora_diffusion.core import config as config_lib
    from lora_diffusion.engine.tracking import SweepTracker

    tracker = SweepTracker(uri, sweep, sweep_id=f"{sweep}-0001")
    tracker.parent_run()
    for rank, seed, score in ((4, 0, 0.61), (4, 1, 0.65), (8, 0, 0.70), (8, 1, 0.72)):
        flat = config_lib.from_dict({}, {"trajectory.rank": rank, "train.seed": seed}).flat()
        run = tracker.trial_run(f"t_{rank}_{seed}", params=flat, tags={"method": "trajectory", "seed": seed,
                                                                          "task": "sst2"})
        tracker.log_final(run, {"validation/accuracy": score, "test/accuracy": score - 0.02,
                                "accounting": {"trainable_params": rank * 100, "bytes_saved": rank * 400}}, 10)
        tracker.end_run(run, "FINISHED")


def test_a_grid_report_built_from_its_mlflow_runs_changes_only_its_date_when_built_again(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _logged_grid(uri, "ranks")
    report = tmp_path / "ranks.md"
    report.write_text('<!-- results {"kind": "grid", "title": "Rank", "sweep": "ranks", "reference": '
                      '"trajectory.rank=4", "command": "python jobs/ablation_grid.py --grid g --name ranks", '
                      '"protocol": "2 seeds"} -->\n')
    ctx = results.Context(tmp_path, uri, str(tmp_path / "sweeps"))
    assert results.rebuild(report, ctx, "2030-01-02 03:04 UTC") == "rebuilt ranks.md"
    first = report.read_text()
    assert "| 8 |" in first.replace("| 8.0 |", "| 8 |") and "Ablation of sweep" not in first
    results.rebuild(report, ctx, "2031-05-06 07:08 UTC")
    assert dates_masked(report.read_text()) == dates_masked(first)
