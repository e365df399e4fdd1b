"""Hugging Face Hub ids, resolved through huggingface_hub's cache.

``mtreg trunk add`` and ``mtreg onboard --teacher`` take a folder or a Hub id
(``owner/name``, optionally ``@revision``). An id is fetched with huggingface_hub into its
cache (``HF_HUB_CACHE`` / ``HF_HOME``), or only looked up there when ``HF_HUB_OFFLINE`` is
set; only configs, safetensors weights and tokenizer files are fetched, never a pickle.
Pushing an exported folder goes through the same library.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mtreg.core.extras import require
from mtreg.errors import MtregError

# owner/name as the Hub spells repository ids (the owner is required: a bare word is far
# more often a mistyped folder than a legacy canonical model).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}(?:@[\w./-]{1,128})?$")
WANTED = ["*.json", "*.safetensors", "*.txt", "*.model"]
_TRUE = {"1", "ON", "YES", "TRUE"}


def is_hub_id(text: str) -> bool:
    """Return whether ``text`` is shaped like a Hub model id (``owner/name[@revision]``)."""
    return bool(_HUB_ID.match(text)) and ".." not in text


def offline() -> bool:
    """Return whether ``HF_HUB_OFFLINE`` asks for no network (read at each call)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def resolve(source: str | Path, what: str) -> Path:
    """Return the folder ``source`` names: an existing path as it is, else a Hub id's
    snapshot in huggingface_hub's cache (downloaded unless offline).

    Raises:
        MtregError: neither a folder nor a Hub id, an id missing from the cache when
            offline, or one the Hub cannot give; one line naming ``what`` and the fix.
    """
    path = Path(source).expanduser()
    text = str(source)
    if path.exists() or not is_hub_id(text) or text.startswith((".", "/", "~")):
        return path
    repo, _, revision = text.partition("@")
    require("huggingface_hub")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(
            repo,
            revision=revision or None,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=offline(),
            allow_patterns=WANTED,
        )
    except LocalEntryNotFoundError:
        raise MtregError(
            f"{what} {text}: not a folder, and not in the Hugging Face cache"
            + (" (HF_HUB_OFFLINE is set)" if offline() else " (the Hub could not be reached)")
            + f": download it with `hf download {repo}` where there is a network, or pass a folder"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        reason = type(exc).__name__.removesuffix("Error")
        raise MtregError(f"{what} {text}: the Hub answers {reason}: check the id") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MtregError(f"{what} {text}: cannot fetch it from the Hub ({first})") from None
    return Path(folder)


def check_push(repo: str) -> str:
    """Return ``repo`` if an export can be pushed there: an ``owner/name`` id, and the
    network allowed.

    Raises:
        MtregError: another shape, or ``HF_HUB_OFFLINE`` set.
    """
    if "@" in repo or not is_hub_id(repo):
        raise MtregError(f"--push-to-hub {repo!r}: give a Hub repository id as owner/name")
    if offline():
        raise MtregError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set: unset it to push")
    return repo


def push_folder(folder: Path, repo: str) -> str:
    """Upload ``folder`` to the Hub model repository ``repo`` (created if missing, private
    by default); return the commit URL.

    Raises:
        MtregError: see :func:`check_push`; not logged in, or the Hub refuses; one line.
    """
    check_push(repo)
    require("huggingface_hub")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi()
    try:
        api.create_repo(repo, private=True, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo)
    except LocalTokenNotFoundError:
        raise MtregError(f"--push-to-hub {repo}: not logged in: run `hf auth login`") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MtregError(f"--push-to-hub {repo}: the Hub refused ({first})") from None
    return str(info)
