"""Which epoch is the best, and when to stop: the original's rule (the best re-ranked R@5 of the
validation picks ``best.pth``; training stops after ``patience`` epochs without a better one)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class EarlyStopping:
    """The best score so far and the epochs since it.

    Attributes:
        patience: epochs without a better score before stopping (0: never stop).
        best: the best score so far (higher is better).
        stale: epochs since the best one.
    """

    patience: int
    best: float = -math.inf
    stale: int = 0

    def update(self, score: float) -> bool:
        """Record an epoch's ``score``; returns whether it is the best so far."""
        improved = score > self.best
        self.best, self.stale = max(self.best, score), 0 if improved else self.stale + 1
        return improved

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.stale >= self.patience
