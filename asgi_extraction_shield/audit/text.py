"""Text attacks: replaying the owner's samples, and word-level augmentation of them.

For APIs whose inputs are texts (Hugging Face pipelines, OpenAI-compatible endpoints)
the natural-data attack (Knockoff-style) is the only one that transfers without a model
of the input space: ``replay`` sends the attacker's pool again and again, ``augment``
sends it once and then word-level variants of it (a word dropped, two neighbours swapped,
a word repeated, or a word replaced by one from the pool's vocabulary), the way text
extraction attacks grow a small seed set (Krishna et al., ICLR 2020, use random word
sequences from a vocabulary; these variants stay closer to the owner's data).
"""

from __future__ import annotations

import numpy as np

TEXT_ATTACKS = ("replay", "augment")


def augment_text(text: str, vocabulary: list[str], rng: np.random.Generator) -> str:
    """One word-level edit of ``text`` (a text of one word gains a vocabulary word)."""
    words = text.split()
    if len(words) < 2:
        return " ".join([*words, str(rng.choice(vocabulary))]) if vocabulary else text + " ."
    i = int(rng.integers(len(words)))
    edit = int(rng.integers(4))
    if edit == 0:
        del words[i]
    elif edit == 1:
        j = min(i + 1, len(words) - 1) if i < len(words) - 1 else i - 1
        words[i], words[j] = words[j], words[i]
    elif edit == 2:
        words.insert(i, words[i])
    elif vocabulary:
        words[i] = str(rng.choice(vocabulary))
    return " ".join(words)


def text_queries(attack: str, pool: list[str], budget: int, rng: np.random.Generator) -> list[str]:
    """The ``budget`` queries of a text ``attack`` drawn from the attacker's ``pool``."""
    if attack not in TEXT_ATTACKS:
        raise ValueError(f"unknown text attack {attack!r}")
    vocabulary = sorted({word for text in pool for word in text.split()})
    queries: list[str] = []
    first = True
    while len(queries) < budget:
        for i in rng.permutation(len(pool)):
            if len(queries) >= budget:
                break
            text = pool[int(i)]
            queries.append(
                text if first or attack == "replay" else augment_text(text, vocabulary, rng)
            )
        first = False
    return queries
