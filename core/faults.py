"""Fault injection for crash tests: named points where a test can kill the process.

The registry calls :func:`point` at the moments that matter for crash safety (an object
copied, a bundle directory renamed into place, a transaction about to commit, files about
to be deleted after a commit, ...). In normal use ``MTREG_FAULT`` is unset and a fault point
is one dictionary lookup. A test sets ``MTREG_FAULT=<point>`` in a subprocess's environment:

- ``MTREG_FAULT=<point>``: the process kills itself with SIGKILL at that point (no cleanup,
  no ``finally`` blocks, no database rollback: what a power cut or the OOM killer does);
- ``MTREG_FAULT=<point>:raise``: it raises :class:`InjectedFault` there instead, to exercise
  the cleanup paths in-process;
- ``MTREG_FAULT=<point>:stop``: it stops itself (SIGSTOP) until a test sends SIGCONT, to
  line up a race with another process deterministically.

The environment is read at each point rather than once at import, so that a process
forked from one that imported mtreg still sees its own environment. :data:`POINTS` lists
every point, so a test can go through all of them and notice one that was added.
"""

from __future__ import annotations

import os
import signal

from mtreg.core.env import fault

POINTS: tuple[str, ...] = (
    "objects.incoming",  # an object's bytes written to objects/.incoming-*, not renamed yet
    "objects.stored",  # an object renamed into objects/<sha256>, nothing committed
    "bundle.scratch",  # a bundle's files linked into bundles/.tmp-*, not renamed yet
    "bundle.renamed",  # a bundle directory renamed into place, its row not committed
    "write.before_commit",  # every row of a write transaction added, commit pending
    "write.after_commit",  # a write transaction committed, the command not finished
    "gc.after_commit",  # gc's rows deleted and committed, no file deleted yet
    "gc.deleting",  # gc has deleted one bundle directory or object of several
)


class InjectedFault(RuntimeError):
    """Raised at a point armed with ``MTREG_FAULT=<point>:raise``."""


def point(name: str) -> None:
    """Die here if the environment asks for a fault at point ``name`` (a test hook)."""
    armed = fault()
    if armed is None:
        return
    point, _, action = armed.partition(":")
    if point != name:
        return
    if action == "raise":
        raise InjectedFault(f"fault injected at {name}")
    os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
