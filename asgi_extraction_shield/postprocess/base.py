"""Response post-processing: rewriting what the model returned.

A post-processor gives, per request, a :class:`ResponseTransform` (or ``None`` to
leave the response alone). The middleware feeds it the body chunk by chunk, fixes
``Content-Length``, and falls back to the original bytes if the transform fails, so a
response is never corrupted. Perturbations and watermarks plug in here.
"""

from __future__ import annotations

from typing import Protocol

from starlette.datastructures import Headers

from ..formats.base import ParsedRequest
from ..identity import Identity
from ..policy import Action


class ResponseTransform(Protocol):
    def accepts(self, status: int, headers: Headers) -> bool:
        """Whether to rewrite this response (called once, on ``http.response.start``).

        Responses with a ``Content-Encoding`` are never offered.
        """
        ...

    def feed(self, chunk: bytes, more_body: bool) -> bytes:
        """Rewritten output for the input so far; input not yet rewritten is held back."""
        ...

    def unprocessed(self) -> bytes:
        """The raw input held back: sent as is if ``feed`` fails."""
        ...


# A transform may also have ``observes_only = True``: it reads the response and never
# changes it, so the response start and every chunk go out as they come.


class PostProcessor(Protocol):
    def transform_for(
        self, identity: Identity, request: ParsedRequest, action: Action
    ) -> ResponseTransform | None: ...
