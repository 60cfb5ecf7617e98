"""The extraction lab: real attacks on a digits classifier behind ``ExtractionShield``.

A scikit-learn MLP trained on ``load_digits`` is served as KServe v1 by a Starlette app
behind the shield, and driven in process (``httpx.ASGITransport``, a fake clock) by four
extraction attacks — uniform synthetic queries, JBDA, Knockoff-style natural queries and
boundary probing — each from one identity and split over sybils, and by a population of
benign users. The lab measures when the shield reacts, how faithful the thieves' copies
are with the shield off and on, and what benign users pay, and writes a markdown report
with plots. Run it from the repository root::

    python -m examples.extraction_lab            # full: budgets up to 10,000 queries
    python -m examples.extraction_lab --quick    # seconds, for CI

In code::

    from examples.extraction_lab import full, run_lab, write_report

    result = run_lab(full().with_overrides({"monitor": {"novelty": "0.1:0.12"}}))
    write_report(result, Path("REPORT.md"))
"""

from .config import LabConfig, full, quick
from .lab import LabResult, run_lab
from .report import write_report

__all__ = ["LabConfig", "LabResult", "full", "quick", "run_lab", "write_report"]
