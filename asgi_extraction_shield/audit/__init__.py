"""Audit of a running endpoint: what an extraction attacker would get from it."""
