"""The library's logger: quiet by default (warnings only), louder with ``set_verbosity``."""

from __future__ import annotations

import logging

__all__ = ["get_logger", "set_verbosity"]

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
