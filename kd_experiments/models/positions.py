"""Which feature positions a zoo model's `forward_intermediates(indices=...)` returns (timm's convention)."""

from collections.abc import Sequence


def positions_to_take(indices: int | Sequence[int] | None, num_positions: int) -> set[int]:
    """None: every position; an int n: the last n; a sequence: those positions (negatives allowed)."""
    if indices is None:
        return set(range(num_positions))
    if isinstance(indices, int):
        if not 0 < indices <= num_positions:
            raise ValueError(f"indices={indices} must be between 1 and {num_positions}")
        return set(range(num_positions - indices, num_positions))
    take = set()
    for index in indices:
        if not -num_positions <= index < num_positions:
            raise ValueError(f"index {index} is out of range for {num_positions} feature positions")
        take.add(index % num_positions)
    if not take:
        raise ValueError("indices must name at least one feature position")
    return take
