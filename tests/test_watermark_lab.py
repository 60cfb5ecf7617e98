"""The extraction lab's watermark evaluation, quick configuration, run in process."""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("CI"):
    import sklearn  # noqa: F401
else:
    pytest.importorskip("sklearn")

from examples.extraction_lab import drw_keys
from examples.extraction_lab.watermarks import SIGNIFICANCE, quick, report, run


def test_quick_watermark_evaluation() -> None:
    config = quick()
    result = run(config)
    thieves = {(r.suspect, r.budget, r.scheme): r for r in result.rows if r.budget is not None}
    for budget in config.budgets:
        for key in (
            ("soft", "drw"),
            ("soft", "drw + reference"),
            ("soft", "dawn"),
            ("label", "dawn"),
            ("label-linear", "dawn"),
        ):
            row = thieves[(key[0], budget, key[1])]
            assert 0.0 <= row.p_value <= 1.0
    # A label-only copy made from 2,000 shielded answers carries dawn's marks, to the
    # target of 1e-6 thanks to a keyed label per (region, answer) (one per region: 5e-5).
    assert thieves[("label", max(config.budgets), "dawn")].p_value < 1e-6
    # A soft-label copy of 2,000 answers carries drw's slope along the keyed products
    # (3e-7 with 2,000 probes; 1.3e-4 on the direction alone, features=0).
    assert thieves[("soft", max(config.budgets), "drw")].p_value < 1e-5
    # With the owner's unwatermarked model as reference, what the copy shares with the
    # model anyway cancels: stronger evidence from the same answers.
    with_reference = thieves[("soft", max(config.budgets), "drw + reference")].p_value
    assert with_reference < thieves[("soft", max(config.budgets), "drw")].p_value
    independent = [r for r in result.rows if r.budget is None]
    assert len(independent) == 3 * config.independent
    assert all(r.p_value >= SIGNIFICANCE for r in independent)
    # Cost: dawn changes about rate·(1 − 1/K) of top labels, drw moves a probability by at
    # most 2ε/(1 + 2ε) — but dawn's swap moves two values by up to their gap.
    assert result.top1_changed <= 0.02 + 0.03
    assert result.shielded_accuracy >= result.victim_accuracy - 0.05
    text = report(result)
    for heading in ("## Stolen substitutes", "## Independent models", "## Cost to legitimate"):
        assert heading in text
    assert "nan" not in text.lower()


def test_drw_over_random_keys_runs_both_tests() -> None:
    results = drw_keys.run(keys=2, answers=400)
    assert len({r.secret for r in results}) == 2
    for r in results:
        assert np.isfinite(r.z) and np.isfinite(r.z_reference)
        assert r.z != r.z_reference  # the reference changes the regression tested
    summary = drw_keys.summary(results)
    assert set(summary) == {"alone", "reference"}
    assert all(0 <= s["below"] <= 2 for s in summary.values())
