"""The toy sentiment task the training tests share: its path plugin (a label decided by one
word, so separable), fast settings for the tiny random trunk, the same settings as
``mtreg onboard`` flags, and a registry holding it (the ``toy_registry`` fixture)."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

from factories import Checkpoints

from mtreg.registry.api import Registry
from mtreg.training.settings import Settings

PLUGIN = textwrap.dedent(
    '''
    import random

    import mtreg

    POS = ["good", "great", "love", "excellent", "fun", "fine"]
    NEG = ["bad", "awful", "hate", "terrible", "boring", "slow"]
    FILLER = ["the", "movie", "film", "book", "service", "food", "it", "this", "was", "is"]


    def toy(split):
        """A label decided by one sentiment word among fillers: separable."""
        rng = random.Random({"train": 0, "dev": 1}[split])
        for i in range({"train": 192, "dev": 40}[split]):
            label = "positive" if i % 2 == 0 else "negative"
            words = rng.sample(FILLER, 3)
            words.insert(rng.randrange(5), rng.choice(POS if label == "positive" else NEG))
            yield {"text": " ".join(words), "label": label}


    def empty(split):
        return toy(split) if split == "train" else iter(())


    def bad_label(split):
        yield {"text": "good film", "label": "neutral"}


    def task(name, loader, trunk="tiny", **extra):
        return mtreg.TaskSpec(
            name=name,
            version="1.0.0",
            head=mtreg.HeadSpec("classification", ("negative", "positive")),
            load_dataset=loader,
            metrics=("accuracy",),
            trunk=trunk,
            max_length=16,
            **extra,
        )


    @mtreg.hookimpl
    def register_tasks(register):
        register(task("toy", toy))
        register(task("nodata", None))
        register(task("ghost", toy, trunk="missing"))
        register(task("empty", empty))
        register(task("badlabel", bad_label))
    '''
)

# Fast settings for the tiny model: a random trunk wants a higher rate than a real one.
FAST = Settings(
    teacher_layers=(2,),
    teacher_lrs=(3e-3,),
    student_lrs=(3e-3,),
    epochs=12,
    batch_size=16,
    patience=None,
)


# FAST's search as ``mtreg onboard`` options, in 6 epochs.
FLAGS = ["--search", "2..2", "--lr", "3e-3", "--student-lr", "3e-3", "--epochs", "6"]
FLAGS += ["--batch-size", "16", "--patience", "0"]


# The ``toy_registry`` fixture: ``open(root, url=None)``, a bound open_toy_registry.
OpenRegistry = Callable[..., Registry]


def open_toy_registry(checkpoints: Checkpoints, root: Path, url: str | None = None) -> Registry:
    """Return a registry under ``root`` with trunk ``tiny`` (3 random layers, copied to
    ``root/ckpt``) and the toy plugin on its plugin path."""
    checkpoints.copy(root / "ckpt", num_layers=3, seed=0)
    (root / "plugins").mkdir(parents=True, exist_ok=True)
    (root / "plugins" / "toyplug.py").write_text(PLUGIN)
    registry = Registry(
        url or f"sqlite:///{root / 'registry.db'}", root / "home", [root / "plugins"]
    )
    registry.add_trunk("tiny", root / "ckpt")
    return registry
