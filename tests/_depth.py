"""How hard the property-based tests search.

``AIODETACH_TEST_DEPTH`` scales the example counts of the slow Hypothesis
searches (those that drive a whole service, not the pure machine): 1, the
default, keeps the fast tiers quick; CI's everything stage sets 3.4, the
depth these searches had before the fast tiers had a time budget.  Every
count stays at least 1, so no setting turns a search off.
"""

from __future__ import annotations

import os

__all__ = ["examples"]


def examples(base: int) -> int:
    """``base`` examples, scaled by ``AIODETACH_TEST_DEPTH``."""
    return max(1, round(base * float(os.environ.get("AIODETACH_TEST_DEPTH", "1"))))
