"""``mtreg serve``: an HTTP server for a bundle, with micro-batching and hot reload.

Modules: :mod:`config` (the server's options), :mod:`requests` (checking and planning a
request against the bundle), :mod:`inference` (running one mixed-task micro-batch),
:mod:`batcher` (the bounded queue and the inference thread), :mod:`metrics` (Prometheus),
:mod:`reload` (loading bundles and following the ``serving`` alias), :mod:`app` (the ASGI
application) and :mod:`server` (uvicorn, signals, the command's Python entry point).
"""

from mtreg.serving.config import ServeConfig

__all__ = ["ServeConfig"]
