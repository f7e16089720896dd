"""Progress bars for the long-running commands: train, score-file, evaluate, and outcomes sync's
HubSpot search pages."""

from __future__ import annotations

from tqdm import tqdm


def progress(desc: str):
    """A progress bar on a terminal, silence in CI logs."""
    return lambda items: tqdm(items, desc=desc, leave=False, disable=None)
