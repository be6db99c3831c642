"""The memory budget across workers: least-recently-used idle models make room, idle ones are reaped.

A model stopped here is `parked`: it loads again at its next request. Nothing here awaits a
stop it does not need to: the reaper only asks handles to stop, and making room re-checks
every candidate after each awaited stop, since requests keep arriving meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from .handle import ModelHandle

log = logging.getLogger("mlxd.lifecycle")

REAP_INTERVAL = 1.0


class MemoryBudget:
    def __init__(self, supervisor):
        self.sup = supervisor

    def _need(self, h: Optional[ModelHandle]) -> int:
        """What `h` will use: its last size, else what a model of the same source and dtype uses."""
        if h is None:
            return 0
        return h.memory_estimate or max((x.memory_estimate for x in self.sup.all_handles()
                                         if x.cfg.source == h.cfg.source and x.cfg.dtype == h.cfg.dtype), default=0)

    async def make_room(self, h: Optional[ModelHandle]) -> None:
        """Stop least-recently-used idle, unpinned models until `h` (or, with None, what runs) fits.

        Runs before a load, once the model is ready and its real size is known, and when the
        budget changes. Never stops a model of the same name as `h`: that is the routed
        handle `h` replaces, which serves until the switch.
        """
        need, tried = self._need(h), set()
        while (budget := self.sup.config.server.memory_budget) is not None:
            loaded = [x for x in self.sup.all_handles() if x.running and x is not h]
            used = sum(x.memory_estimate for x in loaded)
            if used + need <= budget:
                return
            routed = {id(x) for x in self.sup.handles.values()}       # not a replacement about to switch in
            victims = [x for x in loaded if x.state == "ready" and not x.pinned and not x.busy
                       and id(x) in routed and (h is None or x.name != h.name) and id(x) not in tried]
            if not victims:
                log.warning("%s exceeds the memory budget (%d + %d > %d bytes) and nothing idle can be stopped",
                            h.name if h else "what runs", used, need, budget)
                return
            v = min(victims, key=lambda x: x.last_used or 0)
            log.info("stopping idle model %s to make room for %s under the memory budget", v.name,
                     h.name if h else "the new budget")
            v.parked = True
            tried.add(id(v))
            await v.stop()

    async def reap_idle(self) -> None:
        """Stop workers idle past their model's idle_ttl; no exception ends this loop."""
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            try:
                self.reap_once(time.time())
            except Exception:
                log.exception("the idle reaper failed; it goes on")
                self.sup.metrics.internal_error("reaper")

    def reap_once(self, now: float) -> None:
        for h in list(self.sup.handles.values()):
            ttl = h.idle_ttl
            if ttl and h.state == "ready" and not h.pinned and not h.busy \
                    and now - (h.last_used or h.started_wall) > ttl:
                log.info("model %s idle for %.0fs: stopping its worker", h.name, ttl)
                h.parked = True
                h.request_stop()       # the handle's own task stops it; never awaited here
