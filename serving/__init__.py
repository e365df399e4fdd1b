"""``mtreg serve``: an HTTP server for a bundle, with micro-batching and hot reload.

Modules: :mod:`config` (the server's options), :mod:`plan` (checking and planning a
request against the bundle), :mod:`batcher` (the bounded queue and the inference thread,
which runs mixed-task micro-batches with :meth:`mtreg.runtime.bundle.LoadedBundle.run`),
:mod:`dispatch` (queueing planned rows and waiting for their answers: the path every
protocol takes), :mod:`metrics` (Prometheus), :mod:`access` (the access log),
:mod:`reload` (loading bundles and following the ``serving`` alias), :mod:`schemas`
(request and response bodies of ``/v1``), :mod:`oip` and :mod:`v2` (the Open Inference
Protocol: its bodies and tensors, its routes), :mod:`app` (the ASGI application: its routes,
state and lifespan), :mod:`protocol` (HTTP connections: header deadline, connection limit)
and :mod:`server` (uvicorn, signals, draining, the command's Python entry point).
"""

from mtreg.serving.config import ServeConfig

__all__ = ["ServeConfig"]
