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

from mtreg.artifacts.bundle_dir import remove_bundle_dir
from mtreg.artifacts.manifest import bundle_directory
from mtreg.core.disk import disk_errors
from mtreg.errors import MtregError
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


def _onnx_cached(
    registry: Registry, source: Path, record_id: str, tasks, backend: str
) -> LoadedBundle:
    """Load the ONNX export of registry bundle ``record_id`` (folder ``source``), made once
    and cached under the registry home (registry bundles hold torch weights only).

    A cached export is used only if it verifies (its graph files hash to its ``onnx.json``,
    which names this bundle as its source); a stale or damaged one is exported again.
    """
    # onnx is an optional extra: imported only when the ONNX backend is asked for.
    from mtreg.runtime.export import export_onnx

    out = registry.home.onnx(record_id, tasks)
    if out.exists():
        try:
            loaded = LoadedBundle(out, tasks, backend)
            source_id = loaded.onnx_info.source if loaded.onnx_info else ""
            if source_id == record_id:
                return loaded
            problem = f"it was exported from bundle {source_id[:12]}"
        except MtregError as exc:
            problem = str(exc)
        log.warning("rebuilding the ONNX cache %s: %s", out, problem)
        remove_bundle_dir(out)
    with disk_errors(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
    # The one export written inside a home on purpose: its ONNX cache, which verify checks.
    export_onnx(source, out, tasks=tasks, expected_id=record_id, homes=())
    return LoadedBundle(out, tasks, backend)


def load_served(
    ref: str,
    tasks: tuple[str, ...] | None,
    backend: str,
    registry: Registry | None = None,
    device: str = "cpu",
) -> Served:
    """Load the bundle ``ref`` names: a directory, or an alias / id looked up in ``registry``.

    Raises:
        NotFound, InvalidWeights, MtregError: as :func:`mtreg.runtime.bundle.load_bundle`.
    """
    directory = bundle_directory(ref)
    if directory is not None:
        loaded = LoadedBundle(directory, tasks, backend, device=device)
        return Served(loaded, loaded.bundle_id)
    if registry is None:
        raise ValueError(f"{ref!r} is not a bundle directory and no registry was given")
    record = registry.bundle(ref)
    path = registry.bundle_dir(record)
    if backend in ("onnx", "auto") and device == "cpu":  # LoadedBundle refuses them on a GPU
        # The cached export's own manifest is a subset when tasks are chosen; its
        # onnx.json ties it to this bundle, whose id is the one served.
        return Served(_onnx_cached(registry, path, record.id, tasks, backend), record.id)
    loaded = LoadedBundle(
        path, tasks, backend, expected_id=record.id, home=registry.home, device=device
    )
    return Served(loaded, record.id)


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
        device: str = "cpu",
    ) -> None:
        self.alias = alias
        self.tasks = tasks
        self.backend = backend
        self.device = device
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
            served = load_served(target, self.tasks, self.backend, registry, self.device)
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
