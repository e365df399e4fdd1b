"""Head kinds, one module each, behind one interface (:class:`~mtreg.heads.base.HeadKind`).

``get(kind)`` returns the kind's object; callers ask it for label encoding, losses,
decoding, results, default metrics and export facts instead of comparing kind names.
Adding a kind is one module here plus its entry in :data:`mtreg.core.spec.KIND_RULES`.
"""

from __future__ import annotations

from mtreg.core.spec import HEAD_KINDS
from mtreg.errors import MtregError
from mtreg.heads.base import HeadKind
from mtreg.heads.classification import Classification
from mtreg.heads.multilabel import Multilabel
from mtreg.heads.regression import Regression
from mtreg.heads.tagging import Tagging

KINDS: dict[str, HeadKind] = {
    kind.name: kind for kind in (Classification(), Multilabel(), Regression(), Tagging())
}


def get(kind: str) -> HeadKind:
    """Return the head kind named ``kind``.

    Raises:
        MtregError: an unknown kind (the message lists the known ones).
    """
    if kind not in KINDS:
        raise MtregError(f"unknown head kind {kind!r}: use one of {', '.join(HEAD_KINDS)}")
    return KINDS[kind]
