"""Settings from YAML become dataclasses; a misspelt key must fail loudly, naming the keys that exist."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def check_known_fields(cls: type, values: Mapping[str, Any], what: str) -> None:
    """Raise ValueError if `values` has keys that are not fields of the dataclass `cls` (`what` names it)."""
    check_known_names(values, {f.name for f in dataclasses.fields(cls)}, what)


def check_known_names(values: Mapping[str, Any], known: set[str], what: str) -> None:
    """Raise ValueError if `values` has keys that are not in `known` (`what` names the group)."""
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {what} {sorted(unknown)}; known: {sorted(known)}")
