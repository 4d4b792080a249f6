"""Named points where a run can be made to wait, so a test kills it exactly there, not by timing luck.

    RESNET_TRAIN_PAUSE_AT=validation resnet-train ...        wait at the first validation
    RESNET_TRAIN_PAUSE_AT=checkpoint_write@3 resnet-train ...  at the third checkpoint write

The process prints `paused at <name>` on stderr and sleeps until it is killed (or, with
RESNET_TRAIN_PAUSE_SECONDS=N, for N seconds: time to send it a signal that stops it gracefully at
the next step boundary). The points, in the
order a run meets them: train_step (after an optimizer step), checkpoint_write (last.pt written
to its temporary file, not yet renamed), validation (after evaluating, before anything is
recorded), best_update (last.pt saved, best.pt not yet updated), final_test (the test evaluated,
nothing recorded yet), exit (everything written, the process about to end).
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

POINTS = ("train_step", "checkpoint_write", "validation", "best_update", "final_test", "exit")
_seen: Counter = Counter()
_released = False


def release() -> None:
    """End a timed pause now (a graceful stop was asked for: the run goes on to stop at the next step)."""
    global _released
    _released = True


def point(name: str) -> None:
    """Wait here forever if RESNET_TRAIN_PAUSE_AT names this point (and this is the asked-for visit)."""
    wanted = os.environ.get("RESNET_TRAIN_PAUSE_AT")
    if not wanted:
        return
    where, _, nth = wanted.partition("@")
    if where != name:
        return
    _seen[name] += 1
    if _seen[name] == int(nth or 1):
        print(f"paused at {wanted}", file=sys.stderr, flush=True)
        until = time.time() + float(os.environ.get("RESNET_TRAIN_PAUSE_SECONDS", "inf"))
        while time.time() < until and not _released:
            time.sleep(min(0.1, max(until - time.time(), 0)))
