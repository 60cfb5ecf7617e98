"""The attacks: query strategies of a thief who wants a copy of the victim.

The strategies themselves (uniform, JBDA, Knockoff-style natural queries, boundary
probing) are the package's (:mod:`asgi_extraction_shield.audit.attacks`, where they are
described); the lab runs them in the digits' feature box (64 pixels in [0, 16]) with an
augmentation made for 8×8 images. Each strategy yields one query at a time and is sent
back the answer, the probability row the API returned, or ``None`` when the request was
refused. The lab drives a strategy from one identity or from many (sybils), always in
the same order, so a split changes who asks, not what is asked.
"""

from __future__ import annotations

import numpy as np

from asgi_extraction_shield.audit.attacks import (
    Answer,
    Box,
    Strategy,
    StrategyFactory,
)
from asgi_extraction_shield.audit.attacks import strategies as box_strategies

from .victim import N_FEATURES, PIXEL_MAX, Array

__all__ = ["PIXELS", "Answer", "Strategy", "StrategyFactory", "augment", "strategies"]

PIXELS = Box.uniform(0.0, PIXEL_MAX, N_FEATURES)
"""The digits' feature box."""


def augment(x: Array, rng: np.random.Generator) -> Array:
    """A light augmentation of an 8×8 digit: shift by up to a pixel, contrast, noise."""
    image = x.reshape(8, 8)
    dy, dx = rng.integers(-1, 2, size=2)
    shifted = np.zeros_like(image)
    shifted[max(dy, 0) : 8 + min(dy, 0), max(dx, 0) : 8 + min(dx, 0)] = image[
        max(-dy, 0) : 8 + min(-dy, 0), max(-dx, 0) : 8 + min(-dx, 0)
    ]
    out = shifted * rng.uniform(0.85, 1.15) + rng.normal(0.0, 0.5, image.shape)
    return np.clip(out, 0.0, PIXEL_MAX).ravel()


def strategies(jbda_seeds: int, jbda_rounds: int) -> dict[str, StrategyFactory]:
    return box_strategies(PIXELS, augment, jbda_seeds, jbda_rounds)
