"""How many times the GAN halves its grid: shared by the config check and the networks (no torch here)."""

from __future__ import annotations

__all__ = ["network_levels"]


def network_levels(image_size: list[int] | tuple[int, ...]) -> int:
    """Number of 2x up/down-sampling stages for ``image_size``: the smallest side ends at 4 to 7 voxels."""
    smallest = min(image_size)
    levels = 0
    while smallest // 2 >= 4:
        smallest //= 2
        levels += 1
    return max(levels, 1)
