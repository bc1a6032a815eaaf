"""What the page's number fields give, checked: a whole number within the page's bounds on a request (one that skips
the page can send any number), and the seed."""
from __future__ import annotations

from scalegen.errors import UserError

MAX_SEED = 2**63 - 1  # torch's generators take a signed 64-bit seed


def checked_whole(value: float | None, name: str, low: int, high: int, low_note: str = "",
                  high_note: str = "") -> int:
    """A field's whole number from `low` to `high` as an int (the page's bound on a request: one that skips the page
    can send any number); a one-line error for an empty field, a fraction or one out of range."""
    if value is None or not float(value).is_integer() or not low <= value <= high:
        given = "an empty field" if value is None else f"{value:g}"
        raise UserError(f"{name} must be a whole number from {low}{low_note} to {high}{high_note}, not {given}")
    return int(value)


def checked_seed(seed: float | None) -> int:
    """The seed field's value as an int, from 0 to MAX_SEED."""
    return checked_whole(seed, "the seed", 0, MAX_SEED)
