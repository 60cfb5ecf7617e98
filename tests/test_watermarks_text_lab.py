"""The embedding and text watermark lab (examples/extraction_lab/watermarks_text.py),
quick configuration: stolen copies are caught, independent models are not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("CI"):
    import sklearn  # noqa: F401
else:
    pytest.importorskip("sklearn")

from examples.extraction_lab import watermarks_text as lab


@pytest.fixture(scope="module")
def report() -> lab.Report:
    return lab.run(lab.Config.quick())


def test_stolen_copies_are_caught_at_2000_answers(report: lab.Report) -> None:
    caught = {row.what: row.p_value for row in report.thieves if row.budget >= 2_000}
    assert caught["embmarker: ridge substitute"] < 1e-6
    assert caught["text (synonyms): bigram imitation"] < 1e-6
    assert caught["text (synonyms + green list): bigram imitation"] < 1e-6
    assert all(row.probes > 0 for row in report.thieves)


def test_independent_models_are_not_flagged(report: lab.Report) -> None:
    for scheme in ("embmarker", "text"):
        rows = report.independent[scheme]
        assert len(rows) == report.config.independent
        assert sum(row.p_value < 1e-3 for row in rows) <= 1


def test_costs_are_measured_and_bounded(report: lab.Report) -> None:
    costs = report.costs
    assert 0 < costs["embmarker: answers changed"] < 0.5
    assert costs["embmarker: mean cosine, all answers"] > 0.95
    assert 0 < costs["text: words changed by the synonyms"] < 0.3


def test_the_report_is_written(report: lab.Report, tmp_path: Path) -> None:
    text = lab.markdown(report, "python -m examples.extraction_lab.watermarks_text --quick")
    for heading in ("## Stolen copies", "## Independent models", "## Cost to legitimate users"):
        assert heading in text
    assert "nan" not in text.lower()
