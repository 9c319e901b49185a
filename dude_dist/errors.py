"""The one error hierarchy of dude_dist.

Every error a user can act on derives from :class:`DudeError`; the entry points in
``launch/`` print it as one ``error: ...`` line and exit with status 2, without a
traceback. Messages name the bad value, where it came from (config key, file:line,
layer, checkpoint file) and what would be valid. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class DudeError(Exception):
    """Base of the errors a user can act on (bad config, data, model path, checkpoint)."""


class ConfigError(DudeError, ValueError):
    """A configuration value that cannot be used; the message says where it came from."""


class DataError(DudeError, ValueError):
    """Data that cannot be used; the message names the source (file:line, field, config key)."""


class ModelLoadError(DudeError, ValueError):
    """The configured model cannot be loaded; the message says which key and why."""


class PlanError(DudeError, ValueError):
    """The planner cannot find or use the model facts; the message says what to pass."""


class CheckpointError(DudeError, RuntimeError):
    """A checkpoint that cannot or must not be loaded; the message names the file."""


class TrainingError(DudeError, RuntimeError):
    """The run cannot go on; the message says why and what was kept."""


class LaunchError(DudeError, RuntimeError):
    """The process group cannot start (address, port, devices); the message says what to change."""


class RunDirBusyError(DudeError, RuntimeError):
    """Another live run holds the run directory; the message names it (host, pid, start time)."""


def read_json(path: str | Path, error: type[DudeError], label: str | None = None) -> Any:
    """The value of a UTF-8 JSON file; any problem raises one ``error`` that names ``label``
    (default: the path), and for invalid JSON its line and column."""
    name = label or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{name} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{name} cannot be read as UTF-8 ({type(exc).__name__}: {exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{name}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
