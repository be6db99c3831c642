"""Watch the config file and reload on change, however the editor saves it.

Editors save by writing in place, by writing a temp file and renaming it over, or through
a symlink into a dotfiles repo; so we watch the directories of both the path and its
resolved target and match either name. watchfiles batches the burst of events one save
makes into one change set (debounce), so one save is one reload. Nothing ends the watch
but `stop_event`: a failed reload or watch is logged, counted (`on_error`) and retried.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Awaitable, Callable, Optional

from watchfiles import awatch

log = logging.getLogger("mlxd.watch")

RETRY = 1.0


async def watch_config(path: Path, reload: Callable[[], Awaitable[object]], stop_event=None,
                       on_error: Optional[Callable[[], None]] = None) -> None:
    path = Path(path).absolute()
    while stop_event is None or not stop_event.is_set():
        try:
            await _watch(path, reload, stop_event, on_error)
        except Exception:
            log.exception("watching %s failed; watching again in %.0fs", path, RETRY)
            if on_error:
                on_error()
            await asyncio.sleep(RETRY)


async def _watch(path: Path, reload, stop_event, on_error) -> None:
    """Until the symlink changes target (then the caller watches again) or `stop_event`."""
    targets = {path, path.resolve()}
    dirs = sorted({str(p.parent) for p in targets})
    names = {str(p) for p in targets}

    def relevant(_change, changed: str) -> bool:
        return changed in names or str(Path(changed).resolve()) in names

    log.info("watching %s for changes", path)
    async for _ in awatch(*dirs, watch_filter=relevant, debounce=400, step=50, stop_event=stop_event,
                          recursive=False):
        if {path, path.resolve()} != targets:   # the symlink now points elsewhere: follow it
            log.info("config symlink now points to %s", path.resolve())
            await _reload(reload, on_error)
            return
        await _reload(reload, on_error)


async def _reload(reload, on_error) -> None:
    try:
        await reload()
    except Exception:
        log.exception("reloading the config failed; the watch goes on")
        if on_error:
            on_error()
