"""mtreg's optional extras (``pip install 'mtreg[EXTRA]'``): which extra installs each
optional module, and the one-line error when a command needs one that is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from mtreg.errors import MtregError

# The top-level modules each extra of pyproject.toml installs.
EXTRA_MODULES = {
    "serve": ("fastapi", "starlette", "uvicorn", "prometheus_client"),
    "onnx": ("onnx", "onnxruntime"),
    "report": ("matplotlib",),
    "postgres": ("psycopg",),
    "s3": ("s3fs",),
    "gcs": ("gcsfs",),
    "azure": ("adlfs",),
    "ray": ("ray",),
}
# What to install for each module: its extra, or, for a dependency of mtreg itself that
# only some commands import (Hub ids, model cards, --push-to-hub), the dependency.
_PIP = {
    **{module: f"mtreg[{extra}]" for extra, modules in EXTRA_MODULES.items() for module in modules},
    "huggingface_hub": "huggingface_hub>=1.0",
}


def missing_extra(exc: ImportError) -> MtregError | None:
    """Return the error to show for ``exc``, a failed import.

    Returns:
        A one-line :class:`MtregError` naming the missing module and the ``pip install``
        command of its extra, or None when the module is not one an extra installs (a bug
        or a broken installation, which keeps its traceback).
    """
    module = (exc.name or "").partition(".")[0]
    target = _PIP.get(module)
    if target is None:
        return None
    return MtregError(f"{module} is not installed: run pip install '{target}'")


def require(module: str) -> ModuleType:
    """Import and return ``module``, one an optional extra installs (:data:`EXTRA_MODULES`).

    Raises:
        MtregError: it is not installed; one line naming its ``pip install`` command.
        ImportError: it fails for another reason (a broken installation keeps its traceback).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise (missing_extra(exc) or exc) from None
