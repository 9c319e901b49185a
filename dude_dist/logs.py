"""Console logging, set up once per process as soon as its rank is known.

Rank 0 logs at INFO; the other ranks only warnings and errors, each line prefixed with
its rank. Library code uses ``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """Rank 0 logs at ``level``; other ranks only warnings and errors, prefixed with their rank."""
    fmt = f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root = logging.getLogger("dude_dist")
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else logging.WARNING)
    root.propagate = False
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # torch.distributed's deprecation notices fire on every ZeRO-3 reduce-scatter.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
