"""mtreg's optional extras (``pip install 'mtreg[EXTRA]'``): which extra installs each
optional module, and the one-line error when a command needs one that is missing."""

from __future__ import annotations

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
}
_EXTRA_OF = {module: extra for extra, modules in EXTRA_MODULES.items() for module in modules}


def missing_extra(exc: ImportError) -> MtregError | None:
    """Return the error to show for ``exc``, a failed import.

    Returns:
        A one-line :class:`MtregError` naming the missing module and the ``pip install``
        command of its extra, or None when the module is not one an extra installs (a bug
        or a broken installation, which keeps its traceback).
    """
    module = (exc.name or "").partition(".")[0]
    extra = _EXTRA_OF.get(module)
    if extra is None:
        return None
    return MtregError(f"{module} is not installed: run pip install 'mtreg[{extra}]'")
