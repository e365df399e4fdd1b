"""Every ``MTREG_*`` environment variable mtreg reads: its name, and the one function reading it.

No other module reads these variables from ``os.environ``: they call the function here, and
options and messages that name a variable use its constant.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import platformdirs

from mtreg.core.text import split_list
from mtreg.errors import MtregError

HOME_ENV = "MTREG_HOME"
DATABASE_ENV = "MTREG_DATABASE_URL"
STORE_ENV = "MTREG_STORE_URL"
DATA_DIR_ENV = "MTREG_DATA_DIR"
PLUGINS_PATH_ENV = "MTREG_PLUGINS_PATH"
LOAD_PLUGINS_ENV = "MTREG_LOAD_PLUGINS"
PLUGIN_TIMEOUT_ENV = "MTREG_PLUGIN_TIMEOUT"
LOADER_TIMEOUT_ENV = "MTREG_LOADER_TIMEOUT"
CACHE_MAX_BYTES_ENV = "MTREG_CACHE_MAX_BYTES"
CACHE_DIR_ENV = "MTREG_CACHE_DIR"
FAULT_ENV = "MTREG_FAULT"
PROXY_MAX_BODY_ENV = "MTREG_PROXY_MAX_BODY_BYTES"
PROXY_BODY_TIMEOUT_ENV = "MTREG_PROXY_BODY_TIMEOUT_S"

# Long enough for a plugin that imports torch and transformers from a cold disk.
DEFAULT_PLUGIN_TIMEOUT = 60.0
# A task's load_dataset may download and parse a real data set: an hour, not a minute.
DEFAULT_LOADER_TIMEOUT = 3600.0


def resolve_home(home: str | Path | None = None, env: Mapping[str, str] = os.environ) -> Path:
    """Return the registry home: ``home``, else ``$MTREG_HOME``, else the user data dir."""
    chosen = home or env.get(HOME_ENV) or platformdirs.user_data_dir("mtreg", appauthor=False)
    return Path(chosen).expanduser().resolve()


def user_cache_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Return the user's cache folder, for what mtreg learns about this machine's plugins
    (the plugin probe's outcomes): ``$MTREG_CACHE_DIR``, else the platform's user cache dir
    (``~/.cache/mtreg`` on Linux). A registry's own caches stay under ``MTREG_HOME/cache``."""
    chosen = env.get(CACHE_DIR_ENV, "").strip()
    return Path(chosen or platformdirs.user_cache_dir("mtreg", appauthor=False)).expanduser()


def database_url(env: Mapping[str, str] = os.environ) -> str | None:
    """Return ``$MTREG_DATABASE_URL``, or None when it is unset or empty."""
    return env.get(DATABASE_ENV) or None


def store_url(env: Mapping[str, str] = os.environ) -> str | None:
    """Return ``$MTREG_STORE_URL`` (stripped), or None when it is unset or blank."""
    return env.get(STORE_ENV, "").strip() or None


def data_dir(env: Mapping[str, str] = os.environ) -> str | None:
    """Return ``$MTREG_DATA_DIR`` (stripped), or None when it is unset or blank."""
    return env.get(DATA_DIR_ENV, "").strip() or None


@contextlib.contextmanager
def using_data_dir(path: str | Path | None) -> Iterator[Path | None]:
    """Point ``$MTREG_DATA_DIR`` at ``path`` while the block runs (what ``--data-dir`` does).

    The built-in plugins' ``load_dataset`` reads the variable when it is called, so a command
    sets it around loading data and restores the previous value afterwards. ``None`` leaves
    the variable as it is.

    Returns:
        A context yielding ``path`` made absolute, or None.
    """
    if path is None:
        yield None
        return
    folder = Path(path).expanduser().resolve()
    previous = os.environ.get(DATA_DIR_ENV)
    os.environ[DATA_DIR_ENV] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop(DATA_DIR_ENV, None)
        else:
            os.environ[DATA_DIR_ENV] = previous


def plugins_path(env: Mapping[str, str] = os.environ) -> list[str]:
    """Return the entries of ``$MTREG_PLUGINS_PATH`` (``os.pathsep``-separated, empty ones
    dropped); ``[]`` when it is unset."""
    return [entry for entry in env.get(PLUGINS_PATH_ENV, "").split(os.pathsep) if entry]


def load_plugins(env: Mapping[str, str] = os.environ) -> list[str] | None:
    """Return the plugin names in ``$MTREG_LOAD_PLUGINS`` (comma-separated, each once, in
    order); None when it is unset, which allows every plugin."""
    raw = env.get(LOAD_PLUGINS_ENV)
    return None if raw is None else list(dict.fromkeys(split_list(raw)))


def plugin_timeout(env: Mapping[str, str] = os.environ) -> float:
    """Return ``$MTREG_PLUGIN_TIMEOUT``: the seconds a plugin may take to import, and again
    to run its hook, before it is reported as hung; 60 when unset or empty.

    Raises:
        MtregError: the value is not a number of seconds greater than 0.
    """
    return _seconds(PLUGIN_TIMEOUT_ENV, DEFAULT_PLUGIN_TIMEOUT, env)


def loader_timeout(env: Mapping[str, str] = os.environ) -> float:
    """Return ``$MTREG_LOADER_TIMEOUT``: the seconds a task's ``load_dataset`` may take to
    give a whole split before training stops with an error; 3600 when unset or empty.

    Raises:
        MtregError: the value is not a number of seconds greater than 0.
    """
    return _seconds(LOADER_TIMEOUT_ENV, DEFAULT_LOADER_TIMEOUT, env)


def _seconds(name: str, default: float, env: Mapping[str, str]) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (0 < seconds < math.inf):
        raise MtregError(
            f"{name} must be a number of seconds greater than 0, got {raw!r}: fix or unset it"
        )
    return seconds


def cache_max_bytes(env: Mapping[str, str] = os.environ) -> int | None:
    """Return ``$MTREG_CACHE_MAX_BYTES``, or None when it is unset or empty.

    Raises:
        ValueError: the value is not an integer.
    """
    raw = env.get(CACHE_MAX_BYTES_ENV)
    return int(raw) if raw else None


def fault(env: Mapping[str, str] = os.environ) -> str | None:
    """Return ``$MTREG_FAULT`` (``<point>[:action]``, a crash-test hook), or None when unset
    or empty."""
    return env.get(FAULT_ENV) or None


def proxy_body_limits(env: Mapping[str, str] = os.environ) -> dict[str, float]:
    """Return the body limits Ray Serve's proxy enforces, from ``$MTREG_PROXY_MAX_BODY_BYTES``
    (as ``max_body_bytes``) and ``$MTREG_PROXY_BODY_TIMEOUT_S`` (as ``body_timeout_s``); only
    those set and not empty, so that ServeConfig's defaults hold for the rest.

    Raises:
        MtregError: a value is not a positive number.
    """
    limits: dict[str, float] = {}
    raw = env.get(PROXY_MAX_BODY_ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) <= 0:
            raise MtregError(
                f"{PROXY_MAX_BODY_ENV} must be a number of bytes greater than 0, got {raw!r}"
            )
        limits["max_body_bytes"] = int(raw)
    if env.get(PROXY_BODY_TIMEOUT_ENV, "").strip():
        limits["body_timeout_s"] = _seconds(PROXY_BODY_TIMEOUT_ENV, 0.0, env)
    return limits
