"""Tab completion in the notebook for names that live on the engines (`model.<Tab>` after a
`%%distributed` cell defined `model`), from what the engines described after each cell."""

from __future__ import annotations

from typing import Any


class EngineNames:
    """Names, types and attribute names of the engines' variables (rank 0's, or the first rank
    of a cell run on some ranks)."""

    def __init__(self) -> None:
        self.types: dict[str, str] = {}
        self.attributes: dict[str, tuple[str, ...]] = {}

    def update(self, changes: dict[str, Any] | None) -> None:
        if not changes:
            return
        for name, (type_name, attributes) in changes.get("set", {}).items():
            self.types[name], self.attributes[name] = type_name, tuple(attributes)
        for name in changes.get("gone", ()):
            self.types.pop(name, None)
            self.attributes.pop(name, None)

    def clear(self) -> None:
        self.types.clear()
        self.attributes.clear()

    def complete(self, text: str) -> list[str]:
        """Completions of `text`: an engine name, or `name.attr` for one level of attributes."""
        head, dot, tail = text.rpartition(".")
        if not dot:
            return sorted(n for n in self.types if n.startswith(text))
        if head not in self.attributes:
            return []
        return [f"{head}.{a}" for a in self.attributes[head] if a.startswith(tail) and (tail or not a.startswith("_"))]
