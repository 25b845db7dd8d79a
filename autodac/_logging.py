"""The library's logger: quiet by default (warnings only), louder with ``set_verbosity``."""

from __future__ import annotations

import logging
import sys

__all__ = ["get_logger", "set_verbosity", "peak_memory_bytes"]

_ROOT = "autodac"
logging.getLogger(_ROOT).addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def set_verbosity(level: int | str) -> None:
    """Set how much autodac logs, e.g. ``set_verbosity("INFO")`` to see planning steps."""
    logger = logging.getLogger(_ROOT)
    logger.setLevel(level)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.NullHandler) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[autodac %(levelname)s] %(message)s"))
        logger.addHandler(handler)


def peak_memory_bytes() -> int | None:
    """The process's peak resident memory so far (Linux ``VmHWM``, else ``ru_maxrss``); None where neither can be read."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
