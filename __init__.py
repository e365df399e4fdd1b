"""mtreg: a model-plugin registry for multi-task BERT serving.

The public names a plugin author and a Python user need live here::

    import mtreg

    @mtreg.hookimpl
    def register_tasks(register):
        register(mtreg.TaskSpec(name="sentiment", version="1.0.0", ...))

    reg = mtreg.Registry()          # the same operations as the CLI
    bundle = mtreg.load_bundle("serving")
    bundle.predict(["where is my parcel?"])
"""

from mtreg.core.spec import HeadSpec, TaskSpec
from mtreg.errors import MtregError
from mtreg.plugins.hookspecs import hookimpl

__all__ = ["HeadSpec", "MtregError", "Registry", "TaskSpec", "hookimpl", "load_bundle"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Registry pulls in SQLAlchemy, load_bundle torch: keep `import mtreg` cheap for plugins.
    if name == "Registry":
        from mtreg.registry.api import Registry

        return Registry
    if name == "load_bundle":
        # Pulls in torch: only when a bundle is actually loaded.
        from mtreg.runtime.bundle import load_bundle

        return load_bundle
    raise AttributeError(f"module 'mtreg' has no attribute {name!r}")
