"""Watch the config file, and the files it names, and reload on change, however the editor saves it.

Editors save by writing in place, by writing a temp file and renaming it over, or through
a symlink into a dotfiles repo; so we watch the directories of both the path and its
resolved target and match either name. The files the config points to (chat templates)
are watched the same way: editing one is a change of its model's entry. watchfiles batches the burst of events one save
makes into one change set (debounce), so one save is one reload. Nothing ends the watch
but `stop_event`: a failed reload or watch is logged, counted (`on_error`) and retried.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Optional

from watchfiles import awatch

log = logging.getLogger("mlxd.watch")

RETRY = 1.0


async def watch_config(path: Path, reload: Callable[[], Awaitable[object]], stop_event=None,
                       on_error: Optional[Callable[[], None]] = None,
                       also: Callable[[], Iterable[Path]] = tuple) -> None:
    """`also`: the other files the current config depends on, asked again after each reload."""
    path = Path(path).absolute()
    while stop_event is None or not stop_event.is_set():
        try:
            await _watch(path, reload, stop_event, on_error, also)
        except Exception:
            log.exception("watching %s failed; watching again in %.0fs", path, RETRY)
            if on_error:
                on_error()
            await asyncio.sleep(RETRY)


def _targets(path: Path, also) -> set[Path]:
    files = [path, *(Path(p).expanduser().absolute() for p in also())]
    return {*files, *(p.resolve() for p in files)}


async def _watch(path: Path, reload, stop_event, on_error, also) -> None:
    """Until the set of files (or where a symlink points) changes, then the caller watches
    again, or `stop_event`."""
    targets = _targets(path, also)
    dirs = sorted({str(p.parent) for p in targets if p.parent.is_dir()})
    names = {str(p) for p in targets}

    def relevant(_change, changed: str) -> bool:
        return changed in names or str(Path(changed).resolve()) in names

    log.info("watching %s for changes", path)
    async for _ in awatch(*dirs, watch_filter=relevant, debounce=400, step=50, stop_event=stop_event,
                          recursive=False):
        await _reload(reload, on_error)
        if _targets(path, also) != targets:   # a symlink points elsewhere, or other files are named
            log.info("the config's files changed; watching %s", ", ".join(sorted(map(str, _targets(path, also)))))
            return


async def _reload(reload, on_error) -> None:
    try:
        await reload()
    except Exception:
        log.exception("reloading the config failed; the watch goes on")
        if on_error:
            on_error()
