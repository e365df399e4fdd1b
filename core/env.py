"""Where the registry lives: ``MTREG_HOME`` and the database URL."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import platformdirs

HOME_ENV = "MTREG_HOME"
DATABASE_ENV = "MTREG_DATABASE_URL"


def resolve_home(home: str | Path | None = None, env: Mapping[str, str] = os.environ) -> Path:
    """Return the registry home: ``home``, else ``$MTREG_HOME``, else the user data dir."""
    chosen = home or env.get(HOME_ENV) or platformdirs.user_data_dir("mtreg", appauthor=False)
    return Path(chosen).expanduser().resolve()


def resolve_url(url: str | None, home: Path, env: Mapping[str, str] = os.environ) -> str:
    """Return the database URL: ``url``, else ``$MTREG_DATABASE_URL``, else SQLite in home."""
    return url or env.get(DATABASE_ENV) or f"sqlite:///{home / 'registry.db'}"
