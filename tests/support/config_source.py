"""A config source for in-process reloads (``Live.reload``): the CLI's reads a file."""

from __future__ import annotations

from collections.abc import Hashable

from gateway.config import Config


class FixedSource:
    """Hands out one config; each new source is a change (its fingerprint is the config's
    identity)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return "test"

    def load(self) -> Config:
        return self.config

    def fingerprint(self) -> Hashable:
        return id(self.config)
