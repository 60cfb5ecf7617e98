"""The ``text`` thief: a word-bigram copy of a chat or completion endpoint.

It learns from the (prompt, completion) pairs a run was answered: how often each word
follows each word in the completions, and which word a completion starts with after the
prompt's last word. Probabilities are add-one smoothed within a context and back off
when the context was never seen (the first word: prompt's last word → any completion's
start → unigram; later words: previous word → unigram).

Fidelity is *teacher-forced next-word agreement*: over the reference completions of the
held-out prompts, the share of positions where the copy's most likely next word, given
the reference's previous word (the prompt's last word for the first one), is the
reference's word. It measures how well a small imitation reproduces the endpoint's
wording, not what distilling a capable language model from the answers would give.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

THIEF = "text"
_WORD = re.compile(r"\w+|[^\w\s]")
_START = "\x02"
"""The context of a completion's first word; ``_START + w`` after a prompt ending in w."""


def words(text: str) -> list[str]:
    """Words and single punctuation marks, in order."""
    return _WORD.findall(text)


class BigramCopy:
    """A word-bigram model of completions, its first word conditioned on the prompt."""

    def __init__(self) -> None:
        self.follows: dict[str, Counter[str]] = {}
        self.unigram: Counter[str] = Counter()

    def learn(self, prompt: str, completion: str) -> None:
        said = words(completion)
        self.unigram.update(said)
        prompt_last = "".join(words(prompt)[-1:])
        for position, word in enumerate(said):
            previous = said[position - 1] if position else None
            for context in self._chain(prompt_last, previous):
                self.follows.setdefault(context, Counter())[word] += 1

    def _chain(self, prompt_last: str, previous: str | None) -> list[str]:
        """The contexts of a next word, most specific first."""
        return [_START + prompt_last, _START] if previous is None else [previous]

    def probability(self, word: str, prompt_last: str, previous: str | None) -> float:
        """P(word | context): add-one within the first context seen, else the unigram
        (add-one too); the one unseen slot holds every word never seen."""
        vocabulary = len(self.unigram) + 1
        for context in self._chain(prompt_last, previous):
            counts = self.follows.get(context)
            if counts:
                return (counts[word] + 1) / (counts.total() + vocabulary)
        return (self.unigram[word] + 1) / (self.unigram.total() + vocabulary)

    def next_word(self, prompt_last: str, previous: str | None) -> str | None:
        """The most likely next word (ties: the more frequent word, then the first in
        alphabetical order); ``None`` for a copy that learned nothing."""
        counts = next(
            (self.follows[c] for c in self._chain(prompt_last, previous) if c in self.follows),
            self.unigram,
        )
        if not counts:
            return None
        return min(counts, key=lambda w: (-counts[w], -self.unigram[w], w))


def next_word_agreement(copy: BigramCopy, held: Sequence[tuple[str, str]]) -> float | None:
    """Teacher-forced agreement of ``copy`` with the ``(prompt, completion)`` references;
    ``None`` when the references hold no word."""
    hits = positions = 0
    for prompt, completion in held:
        prompt_last = "".join(words(prompt)[-1:])
        previous: str | None = None
        for word in words(completion):
            hits += copy.next_word(prompt_last, previous) == word
            positions += 1
            previous = word
    return hits / positions if positions else None


def text_copy_curve(
    prompts: Sequence[str],
    completions: Sequence[str | None],
    budgets: Sequence[int],
    held: Sequence[tuple[str, str]],
) -> dict[str, dict[int, float]] | None:
    """``{"text": {budget: agreement}}`` of copies trained on the first ``budget``
    prompts and what they were answered (``None``: refused, taught nothing)."""
    copy = BigramCopy()
    curve: dict[int, float] = {}
    learned = 0
    for budget in sorted(set(budgets)):
        for i in range(learned, min(budget, len(prompts))):
            completion = completions[i]
            if completion is not None:
                copy.learn(prompts[i], completion)
        learned = min(budget, len(prompts))  # budgets go up
        agreement = next_word_agreement(copy, held)
        if agreement is None:
            return None
        curve[budget] = agreement
    return {THIEF: curve}
