"""Progress bars that show on a terminal and stay out of CI logs and pipes."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    # disable=None lets tqdm turn itself off when stderr is not a terminal
    return tqdm(iterable, disable=None if enabled else True, leave=False, dynamic_ncols=True, **kwargs)
