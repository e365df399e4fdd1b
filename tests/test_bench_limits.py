"""bench/limits.py's length buckets: every row of a batch runs once, in a sub-batch cut to
its own longest row, and a backend run over the buckets answers what it answers unsplit."""

from __future__ import annotations

import torch
from limits import BUCKETED, bucketed, precision, sub_batches


def _batch(lengths: list[int]) -> dict[str, torch.Tensor]:
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.arange(1, length + 1) + 100 * row
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _row_sums(batch: dict[str, torch.Tensor]) -> dict[int, int]:
    # A stand-in backend: each row's answer depends only on its own tokens.
    return {int(ids[0]) // 100: int(ids.sum()) for ids in batch["input_ids"]}


def test_sub_batches_hold_every_row_once_each_cut_to_its_longest() -> None:
    lengths = [5, 60, 6, 58, 7, 61, 5, 30]
    batch = _batch(lengths)
    pieces = sub_batches(batch, overhead=16)
    assert len(pieces) > 1
    rows = [int(ids[0]) // 100 for piece in pieces for ids in piece["input_ids"]]
    assert sorted(rows) == list(range(len(lengths)))
    for piece in pieces:
        assert piece["input_ids"].shape[1] == int(piece["attention_mask"].sum(1).max())
        assert set(piece) == set(batch)
    assert sum(p["input_ids"].numel() for p in pieces) < batch["input_ids"].numel()


def test_a_bucketed_backend_answers_as_the_unsplit_one() -> None:
    data = [_batch([5, 60, 6, 58]), _batch([3, 3, 40, 41, 12])]
    runs, pieces = bucketed({"torch": _row_sums}, data)
    assert list(runs) == [f"torch{BUCKETED}"] and precision(f"torch{BUCKETED}") == "fp32"
    for batch in data:
        merged: dict[int, int] = {}
        for answer in runs[f"torch{BUCKETED}"](batch):
            merged |= answer
        assert merged == _row_sums(batch)
    assert sum(len(p["input_ids"]) for p in pieces) == sum(len(b["input_ids"]) for b in data)
