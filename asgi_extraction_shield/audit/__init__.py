"""Audit of a running endpoint: what an extraction attacker would get from it.

``extraction-shield audit`` (see :mod:`.cli`) or, in Python::

    from asgi_extraction_shield.audit import AuditConfig, run_audit, write_report

    result = run_audit(AuditConfig(target=url, format="kserve_v1", samples=path))
    print(result.summary())           # the --json summary
    write_report(result, out_dir, command="...")   # AUDIT.md and two PNG plots

The attacks, substitutes and report need the ``lab`` extra (scikit-learn, matplotlib).
"""

from .report import write_report
from .run import AttackRun, AuditConfig, AuditResult, BenignPass, run_audit

__all__ = ["AttackRun", "AuditConfig", "AuditResult", "BenignPass", "run_audit", "write_report"]
