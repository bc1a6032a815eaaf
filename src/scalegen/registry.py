"""The one registry every seam keeps its variants in (objectives, tokenizer kinds, data sources, checkpoint formats,
VAR token heads): named entries in the order they were registered, a name registered once, and a one-line error for a
name no one registered. Torch-free."""
from __future__ import annotations

from typing import Generic, TypeVar

from scalegen.errors import UserError

Entry = TypeVar("Entry")


class Registry(dict[str, Entry], Generic[Entry]):
    """A seam's variants by name (a dict, in registration order).

    Args:
        what: what an entry is, in words ("tokenizer kind"), for the messages.
        advice: what to do about an unknown name, after the list of known ones (default: pick a known one).
    """

    def __init__(self, what: str, advice: str = "") -> None:
        super().__init__()
        self.what, self.advice = what, advice

    def register(self, name: str, entry: Entry) -> Entry:
        """Add `entry` as `name`; returns it. Registering the same entry again changes nothing.

        Raises:
            ValueError: another entry holds the name already.
        """
        known = self.get(name)
        if known is not None and known != entry:
            raise ValueError(f"a {self.what} named {name!r} is registered already")
        self[name] = entry
        return entry

    def chosen(self, name: str) -> Entry:
        """The entry registered as `name`.

        Raises:
            UserError: none is; the message lists the known names.
        """
        if name not in self:
            advice = f"; {self.advice}" if self.advice else ""
            raise UserError(f"unknown {self.what} {name!r}: use one of {', '.join(self)}{advice}")
        return self[name]
