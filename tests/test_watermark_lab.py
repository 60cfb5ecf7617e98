"""The extraction lab's watermark evaluation, quick configuration, run in process."""

from __future__ import annotations

import os

import pytest

if os.environ.get("CI"):
    import sklearn  # noqa: F401
else:
    pytest.importorskip("sklearn")

from examples.extraction_lab.watermarks import SIGNIFICANCE, quick, report, run


def test_quick_watermark_evaluation() -> None:
    config = quick()
    result = run(config)
    thieves = {(r.suspect, r.budget, r.scheme): r for r in result.rows if r.budget is not None}
    for budget in config.budgets:
        for key in (("soft", "drw"), ("soft", "dawn"), ("label", "dawn"), ("label-linear", "dawn")):
            row = thieves[(key[0], budget, key[1])]
            assert 0.0 <= row.p_value <= 1.0
    # A label-only copy made from 2,000 shielded answers carries dawn's marks, to the
    # target of 1e-6 thanks to a keyed label per (region, answer) (one per region: 5e-5).
    assert thieves[("label", max(config.budgets), "dawn")].p_value < 1e-6
    # A soft-label copy of 2,000 answers carries drw's slope along the keyed products
    # (3e-7 with 2,000 probes; 1.3e-4 on the direction alone, features=0).
    assert thieves[("soft", max(config.budgets), "drw")].p_value < 1e-5
    independent = [r for r in result.rows if r.budget is None]
    assert len(independent) == 2 * config.independent
    assert all(r.p_value >= SIGNIFICANCE for r in independent)
    # Cost: dawn changes about rate·(1 − 1/K) of top labels, drw moves a probability by at
    # most 2ε/(1 + 2ε) — but dawn's swap moves two values by up to their gap.
    assert result.top1_changed <= 0.02 + 0.03
    assert result.shielded_accuracy >= result.victim_accuracy - 0.05
    text = report(result)
    for heading in ("## Stolen substitutes", "## Independent models", "## Cost to legitimate"):
        assert heading in text
    assert "nan" not in text.lower()
