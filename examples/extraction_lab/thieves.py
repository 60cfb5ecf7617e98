"""The thieves: substitutes trained on the answers an attack actually got.

They are the package's (:mod:`asgi_extraction_shield.audit.substitutes`): a soft-label
MLP regressor and a label-only logistic regression, whose fidelity is their top-1
agreement with the victim on the held-out digits. The lab trains them on pixels scaled
to [0, 1], as the victim sees them.
"""

from __future__ import annotations

from collections.abc import Sequence

from asgi_extraction_shield.audit.substitutes import THIEVES
from asgi_extraction_shield.audit.substitutes import fidelity_curve as box_fidelity_curve

from .victim import Array, Labels, scaled

__all__ = ["THIEVES", "fidelity_curve"]


def fidelity_curve(
    queries: Sequence[Array],
    answers: Sequence[Array | None],
    budgets: Sequence[int],
    x_eval: Array,
    victim_labels: Labels,
    seeds: Sequence[int],
) -> dict[str, dict[int, float]]:
    """``{thief: {budget: fidelity}}`` for the prefixes of a campaign's log."""
    return box_fidelity_curve(queries, answers, budgets, x_eval, victim_labels, seeds, scaled)
