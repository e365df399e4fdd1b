"""mtreg: a model-plugin registry for multi-task BERT serving.

The public names a plugin author and a Python user need live here::

    import mtreg

    @mtreg.hookimpl
    def register_tasks(register):
        register(mtreg.TaskSpec(name="sentiment", version="1.0.0", ...))

    reg = mtreg.Registry()          # the same operations as the CLI
"""

from mtreg.errors import MtregError
from mtreg.plugins.hookspecs import hookimpl
from mtreg.plugins.spec import HeadSpec, TaskSpec

__all__ = ["HeadSpec", "MtregError", "Registry", "TaskSpec", "hookimpl"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Registry pulls in SQLAlchemy; keep `import mtreg` cheap for plugin modules.
    if name == "Registry":
        from mtreg.registry.api import Registry

        return Registry
    raise AttributeError(f"module 'mtreg' has no attribute {name!r}")
