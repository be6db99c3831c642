"""Watch the config file and reload on change, however the editor saves it.

Editors save by writing in place, by writing a temp file and renaming it over, or through
a symlink into a dotfiles repo; so we watch the directories of both the path and its
resolved target and match either name. watchfiles batches the burst of events one save
makes into one change set (debounce), so one save is one reload.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Awaitable, Callable

from watchfiles import awatch

log = logging.getLogger("mlxd.watch")


async def watch_config(path: Path, reload: Callable[[], Awaitable[object]], stop_event=None) -> None:
    path = Path(path).absolute()
    targets = {path, path.resolve()}
    dirs = sorted({str(p.parent) for p in targets})
    names = {str(p) for p in targets}

    def relevant(_change, changed: str) -> bool:
        return changed in names or str(Path(changed).resolve()) in names

    log.info("watching %s for changes", path)
    async for _ in awatch(*dirs, watch_filter=relevant, debounce=400, step=50, stop_event=stop_event,
                          recursive=False):
        new_targets = {path, path.resolve()}
        if new_targets != targets:   # the symlink now points elsewhere: follow it
            log.info("config symlink now points to %s", path.resolve())
            return await watch_config(path, reload, stop_event)
        await reload()
