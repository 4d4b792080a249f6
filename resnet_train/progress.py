"""Progress bars, one way for every phase that shows one (training, evaluation, decoding, checking
files): tqdm, cleared when done, resizing with the terminal."""

from __future__ import annotations

from typing import Any, Iterable

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable | None = None, *, progress: bool | None, **options: Any) -> tqdm:
    """`progress` (the `progress` key): True shows the bar, False hides it, None shows it on a terminal only."""
    return tqdm(iterable, leave=False, dynamic_ncols=True, disable=None if progress is None else not progress,
                **options)
