"""Which BLAS and device a worker computes with, so `mlxd check` and the log can say.

On a CPU device MLX ships a reference BLAS; the daemon preloads an optimized one into each
worker (see `optimized_blas`), and this reads back what the process actually mapped.
"""

from __future__ import annotations

import glob
import sys
from pathlib import Path

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def optimized_blas() -> str | None:
    """Path of a system OpenBLAS to preload into CPU workers on Linux, if there is one."""
    if not sys.platform.startswith("linux"):
        return None
    for path in (*_CANDIDATES, *sorted(glob.glob("/usr/lib/*/openblas*/libopenblas*.so.0"))):
        if Path(path).exists():
            return path
    return None


def loaded_blas() -> str:
    """The BLAS this process runs with, read from its own memory map."""
    if sys.platform == "darwin":
        return "accelerate"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in ("openblas", "mkl", "blis"):
        if f"lib{name}" in maps:
            return name
    return "reference"


def device_name() -> str:
    import mlx.core as mx

    return str(mx.default_device().type).removeprefix("DeviceType.")


def auto_dtype() -> str:
    """What `dtype: auto` means here: keep quantized weights on Metal, f32 on a CPU device."""
    import mlx.core as mx

    return "quantized" if mx.metal.is_available() else "float32"


if __name__ == "__main__":
    import json

    if sys.argv[1:] == ["--path"]:   # for `LD_PRELOAD=$(python -m daemon.worker.blas --path) ...`
        print(optimized_blas() or "")
    else:                          # what a worker started by the daemon computes with
        print(json.dumps({"device": device_name(), "blas": loaded_blas(), "auto_dtype": auto_dtype()}))
