"""Loading the bundle to serve, and following an alias for hot reload.

The reloader polls the registry in a thread of its own. When the alias names another
bundle, that bundle is loaded beside the one serving and swapped in with one assignment;
jobs already queued keep a reference to the old bundle and finish on it. A bundle that
fails to load leaves the old one serving; the failure is logged and shown in /metrics, and
is not retried until the alias moves again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mtreg.artifacts.manifest import bundle_directory
from mtreg.runtime.bundle import LoadedBundle
from mtreg.serving.metrics import ServeMetrics

if TYPE_CHECKING:
    from mtreg.registry.api import Registry

log = logging.getLogger("mtreg.serving")

RegistryFactory = Callable[[], "Registry"]


@dataclass(frozen=True)
class Served:
    """A loaded bundle and its id (the sha256 of its manifest)."""

    bundle: LoadedBundle
    id: str


def is_directory_ref(ref: str) -> bool:
    """True when ``ref`` names a bundle directory rather than an alias or id (see
    :func:`mtreg.artifacts.manifest.bundle_directory`, which raises NotFound for a path
    without a bundle)."""
    return bundle_directory(ref) is not None


def _onnx_folder(registry: Registry, source: Path, record_id: str, tasks) -> Path:
    """Return an ONNX export of registry bundle ``source``, made once and cached under the
    registry home (registry bundles hold torch weights only)."""
    # onnx is an optional extra: imported only when the ONNX backend is asked for.
    from mtreg.runtime.export import export_onnx

    out = registry.home.onnx(record_id, tasks)
    if not (out / "model.onnx").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(source, out, tasks=tasks)
    return out


def load_served(
    ref: str,
    tasks: tuple[str, ...] | None,
    backend: str,
    registry: Registry | None = None,
) -> Served:
    """Load the bundle ``ref`` names: a directory, or an alias / id looked up in ``registry``.

    Raises:
        NotFound, InvalidWeights, MtregError: as :func:`mtreg.runtime.bundle.load_bundle`.
    """
    directory = bundle_directory(ref)
    if directory is not None:
        loaded = LoadedBundle(directory, tasks, backend)
        return Served(loaded, loaded.manifest.bundle_id)
    if registry is None:
        raise ValueError(f"{ref!r} is not a bundle directory and no registry was given")
    record = registry.bundle(ref)
    path = registry.home.bundle(record.id)
    if backend in ("onnx", "auto") and not (path / "model.onnx").is_file():
        path = _onnx_folder(registry, path, record.id, tasks)
    return Served(LoadedBundle(path, tasks, backend), record.id)


class Reloader:
    """Polls ``alias`` every ``interval`` seconds and swaps in the bundle it names.

    Args:
        current: returns the bundle serving now. swap: makes a new one current.
    """

    def __init__(
        self,
        alias: str,
        tasks: tuple[str, ...] | None,
        backend: str,
        registry_factory: RegistryFactory,
        current: Callable[[], Served],
        swap: Callable[[Served], None],
        metrics: ServeMetrics,
        interval: float = 2.0,
    ) -> None:
        self.alias = alias
        self.tasks = tasks
        self.backend = backend
        self.registry_factory = registry_factory
        self.current = current
        self.swap = swap
        self.metrics = metrics
        self.interval = interval
        self.failed_id: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mtreg-reload", daemon=True)

    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (a load under way finishes first, then is dropped)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def _loop(self) -> None:
        # The thread owns its Registry: one database connection pool, never shared.
        registry = self.registry_factory()
        try:
            while not self._stop.wait(self.interval):
                self.check(registry)
        finally:
            registry.close()

    def check(self, registry: Registry) -> bool:
        """Look the alias up once; load and swap if it moved. Return True if swapped."""
        try:
            target = registry.bundle(self.alias).id
        except Exception as exc:  # a database hiccup must not stop the server
            self.metrics.poll_errors.inc()
            log.warning("could not look up alias %r: %s", self.alias, exc)
            return False
        if target == self.current().id and self.failed_id is not None:
            # The alias moved back to the bundle serving: the failure is over.
            self.failed_id = None
            self.metrics.reload_failed.set(0)
        if target in (self.current().id, self.failed_id):
            return False
        log.info("alias %r moved to %s: loading it", self.alias, target[:12])
        try:
            served = load_served(target, self.tasks, self.backend, registry)
        except Exception as exc:
            self.failed_id = target
            self.metrics.reloads.labels(result="failed").inc()
            self.metrics.reload_failed.set(1)
            log.error(
                "bundle %s failed to load, still serving %s: %s",
                target[:12],
                self.current().id[:12],
                exc,
            )
            return False
        if self._stop.is_set():
            return False
        self.swap(served)
        self.failed_id = None
        self.metrics.reloads.labels(result="loaded").inc()
        self.metrics.reload_failed.set(0)
        log.info("now serving bundle %s", served.id[:12])
        return True
