"""The hooks a task plugin can implement. There is one.

A plugin is a module (installed under the ``mtreg`` entry-point group, or a ``.py`` file /
package found through ``--plugins-dir`` / ``MTREG_PLUGINS_PATH``) that defines functions
decorated with :data:`hookimpl`.
"""

from collections.abc import Callable

import pluggy

from mtreg.core.spec import TaskSpec

PROJECT = "mtreg"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_tasks(register: Callable[[TaskSpec], None]) -> None:
    """Contribute tasks by calling ``register(TaskSpec(...))`` once per task.

    Called once each time mtreg discovers plugins. ``register`` validates the spec at once
    (name, version, head) and raises :class:`mtreg.MtregError` for a bad one, so build specs
    cheaply here: do not load data sets or weights, pass a ``load_dataset`` callable and a
    ``weights`` path instead. An exception escaping this hook (``SystemExit`` included), or a
    hook still running after ``$MTREG_PLUGIN_TIMEOUT`` seconds, disables this plugin only;
    ``mtreg plugins`` reports it and every other plugin keeps working. What the hook prints
    is captured, not shown.
    """
