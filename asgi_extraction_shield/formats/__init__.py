"""Payload formats understood by the shield."""

from .base import FlatCost, ParsedRequest, RequestAdapter

__all__ = ["FlatCost", "ParsedRequest", "RequestAdapter"]
