"""What every surface's payload shares: sampling with the model's defaults filled in, and
the checks of tool fields that contradict each other."""

from __future__ import annotations

from typing import Iterable, Optional

from ..errors import APIError


def sampling(handle, max_tokens: Optional[int] = None, temperature: Optional[float] = None,
             top_p: Optional[float] = None, seed: Optional[int] = None, stop: Iterable[str] = (),
             top_k: Optional[int] = None) -> dict:
    """The sampling fields of a payload: what the request says, else the model entry's `sampling`."""
    s = handle.cfg.sampling
    out = {"max_tokens": max_tokens or s.max_tokens,
           "temperature": s.temperature if temperature is None else temperature,
           "top_p": s.top_p if top_p is None else top_p, "seed": seed, "stop": list(stop)}
    if top_k:
        out["top_k"] = top_k
    return out


def check_tools(names: list[str], forced: Optional[str] = None, named: Optional[str] = None,
                named_param: str = "tool_choice") -> None:
    """400 for two tools of one name, a call forced (`forced`: the choice as the client spelled
    it) without tools, or a tool choice naming a tool that is not there."""
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise APIError(400, f"two tools are named {dup!r}", param="tools", code="invalid_value")
    if forced is not None and not names:
        raise APIError(400, f"tool_choice {forced!r} needs 'tools'", param="tool_choice", code="invalid_value")
    if named is not None and named not in names:
        raise APIError(400, f"tool_choice names {named!r}, which is not in 'tools'", param=named_param,
                       code="invalid_value")
