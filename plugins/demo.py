"""Built-in demo plugin: two small tasks whose data ships inside the package.

``demo-sentiment`` (product reviews, positive/negative) and ``demo-intent`` (customer
support messages, four intents) are sentences written for this project. Each file is split
deterministically: every fifth row is dev, the rest train. They exist so that the README's
main command can onboard, merge, export and predict on a fresh machine in minutes.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from importlib import resources

from mtreg.core.spec import HeadSpec, TaskSpec
from mtreg.plugins.hookspecs import hookimpl

DEMO_TRUNK = "minilm"


def _loader(file_name: str):
    def load(split: str) -> Iterator[dict[str, str]]:
        if split not in ("train", "dev"):
            raise ValueError(f"the demo data has train and dev splits, not {split!r}")
        text = (
            resources.files("mtreg.plugins")
            .joinpath("demo_data", file_name)
            .read_text(encoding="utf-8")
        )
        rows = csv.DictReader(text.splitlines(), delimiter="\t")
        for index, row in enumerate(rows):
            if (index % 5 == 0) == (split == "dev"):
                yield {"text": row["text"], "label": row["label"]}

    return load


@hookimpl
def register_tasks(register) -> None:
    register(
        TaskSpec(
            name="demo-sentiment",
            version="1.0.0",
            description="Demo: product review sentiment",
            head=HeadSpec("classification", ("negative", "positive")),
            load_dataset=_loader("review_sentiment.tsv"),
            metrics=("accuracy",),
            trunk=DEMO_TRUNK,
            max_length=32,
        )
    )
    register(
        TaskSpec(
            name="demo-intent",
            version="1.0.0",
            description="Demo: customer support intent",
            head=HeadSpec("classification", ("account", "billing", "shipping", "technical")),
            load_dataset=_loader("support_intent.tsv"),
            metrics=("accuracy",),
            trunk=DEMO_TRUNK,
            max_length=32,
        )
    )
