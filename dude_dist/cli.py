"""What every entry point in launch/ shares: the common flags and how user errors end a run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from dude_dist.errors import DudeError


def base_parser(doc: str | None) -> argparse.ArgumentParser:
    """``--config``, repeated ``--set key=value``, and the ``--local_rank`` that launchers pass."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=10 (repeatable; beats the YAML)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def run_cli(body: Callable[[], None]) -> int:
    """Run ``body``; a user error (bad config, data, paths) is one ``error:`` line and exit code 2.

    An interrupt that gets through (a second Ctrl-C; the first one checkpoints and stops
    cleanly) is one line and exit code 130, as a shell reports SIGINT.
    """
    try:
        body()
    except (DudeError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"error: interrupted: {exc or 'Ctrl-C'}; resume from the newest checkpoint with --resume auto",
              file=sys.stderr)
        return 130
    return 0


def exit_process(code: int) -> None:
    """Leave the process with ``code``, once the run has torn down its process group.

    A rank of a multi-process run ends with ``os._exit`` after flushing its output: the
    interpreter's own shutdown then runs no C++ destructors of the collective backends,
    which can abort the process ("terminate called without an active exception", exit -6)
    after the work is done and saved, and a launcher would report a finished run as failed.
    A single process exits normally.
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
