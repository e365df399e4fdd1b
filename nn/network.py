"""The shared trunk, the merged multi-task network and a single task on its own.

A branch forked at depth k reads the trunk's hidden state after k layers (k = 0 is the
embedding output). :class:`MultiTaskModel` runs the trunk once, up to the deepest fork among
the requested tasks, and feeds each branch the state at its fork; :class:`Standalone` runs
one task alone, for comparison and per-task export.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, MutableMapping, Sequence

import torch
from torch import Tensor, nn

from mtreg.artifacts.config import TrunkConfig
from mtreg.nn.layers import ADAPTERS, Branch, hf_config


class Trunk(nn.Module):
    """Embeddings plus the first ``depth`` encoder layers of a frozen shared encoder, built
    from its family's transformers modules (``nn/layers.py``).

    State dict names: ``embeddings.<HF embedding tensor>``, ``context.*`` (DeBERTa's
    relative embeddings), ``layers.{i}.<HF layer tensor>``.
    """

    def __init__(self, config: TrunkConfig, depth: int) -> None:
        super().__init__()
        if not 0 <= depth <= config.num_hidden_layers:
            raise ValueError(f"trunk depth {depth} outside 0..{config.num_hidden_layers}")
        adapter, hf = ADAPTERS[config.model_type], hf_config(config)
        self.config = config
        self.depth = depth
        self.embed, self.run = adapter.embed, adapter.run
        self.embeddings = adapter.embeddings(hf)
        self.context = adapter.context(hf)
        self.layers = nn.ModuleList(adapter.layer(hf, i) for i in range(depth))

    @classmethod
    def from_tensors(
        cls,
        config: TrunkConfig,
        embeddings: Mapping[str, Tensor],
        layers: list[Mapping[str, Tensor]],
    ) -> Trunk:
        """Return a Trunk of depth ``len(layers)`` loaded (strictly) from the tensors of its
        components (``context.*`` tensors of the embeddings component go to the context)."""
        trunk = cls(config, len(layers))
        own = {k: v for k, v in embeddings.items() if not k.startswith("context.")}
        trunk.embeddings.load_state_dict(own, strict=True)
        context = {k.removeprefix("context."): v for k, v in embeddings.items() if k not in own}
        trunk.context.load_state_dict(context, strict=True)
        for layer, tensors in zip(trunk.layers, layers, strict=True):
            layer.load_state_dict(tensors, strict=True)
        return trunk

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        depths: Iterable[int] | None = None,
    ) -> dict[int, Tensor]:
        """Return {depth: hidden state [B, T, H]} for each requested depth (default: the
        trunk's full depth). Each layer runs once and none beyond the deepest request."""
        wanted = {self.depth} if depths is None else set(depths)
        for d in wanted:
            if not 0 <= d <= self.depth:
                raise ValueError(f"depth {d} outside 0..{self.depth} of this trunk")
        if not wanted:
            return {}
        hidden = self.embed(self.embeddings, input_ids, token_type_ids, attention_mask)
        out = {0: hidden} if 0 in wanted else {}
        context = self.context(hidden, attention_mask) if max(wanted) else None
        for i in range(max(wanted)):
            hidden = self.run(self.layers[i], hidden, context)
            if i + 1 in wanted:
                out[i + 1] = hidden
        return out


class MultiTaskModel(nn.Module):
    """Many task branches on one trunk, each forked at its own depth.

    Attributes:
        tasks: the task names, sorted.
        fork_depths: task -> fork depth.
        branches: task -> Branch (an ``nn.ModuleDict``).
    """

    def __init__(self, trunk: Trunk, branches: Mapping[str, tuple[int, Branch]]) -> None:
        super().__init__()
        for task, (depth, _) in branches.items():
            if not 0 <= depth <= trunk.depth:
                raise ValueError(
                    f"task {task!r} forks at depth {depth}, but the trunk has layers "
                    f"0..{trunk.depth} only"
                )
        self.trunk = trunk
        self.tasks = sorted(branches)
        self.fork_depths = {task: branches[task][0] for task in self.tasks}
        self.branches = nn.ModuleDict({task: branches[task][1] for task in self.tasks})

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        tasks: Iterable[str] | None = None,
        rows: Mapping[str, Sequence[int]] | None = None,
        timings: MutableMapping[str, float] | None = None,
    ) -> dict[str, Tensor]:
        """Return {task: logits} for ``tasks`` (default: all), in sorted task order.

        The trunk runs once over the whole batch, up to the deepest requested fork;
        branches sharing a fork depth read the same hidden state. ``rows`` maps a task to
        the batch rows that need it (default: every row): its branch runs on those only
        and the other rows of its logits hold zeros. With ``timings``, each branch's
        compute time (seconds, the trunk not included) is stored under its task.

        Raises:
            ValueError: for a task this model does not hold.
        """
        names = self.tasks if tasks is None else sorted(set(tasks))
        unknown = [t for t in names if t not in self.fork_depths]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}: this model serves {self.tasks}")
        groups: dict[int, list[str]] = {}
        for task in names:
            groups.setdefault(self.fork_depths[task], []).append(task)
        hidden = self.trunk(input_ids, attention_mask, token_type_ids, depths=groups)
        out: dict[str, Tensor] = {}
        for depth, group in sorted(groups.items()):
            for task in group:
                wanted = None if rows is None else rows.get(task)
                began = time.perf_counter()
                out[task] = self._branch(task, hidden[depth], attention_mask, wanted)
                if timings is not None:
                    timings[task] = time.perf_counter() - began
        return {task: out[task] for task in names}

    def _branch(
        self, task: str, hidden: Tensor, mask: Tensor, rows: Sequence[int] | None
    ) -> Tensor:
        """Run ``task``'s branch on ``rows`` of the batch (all when None), zeros elsewhere."""
        if rows is None or len(rows) == hidden.shape[0]:
            return self.branches[task](hidden, mask)
        index = torch.tensor(rows, dtype=torch.long, device=hidden.device)
        some = self.branches[task](hidden.index_select(0, index), mask.index_select(0, index))
        full = some.new_zeros((hidden.shape[0], *some.shape[1:]))
        full[index] = some
        return full


class Standalone(nn.Module):
    """One task alone: the trunk up to ``fork_depth``, then its branch."""

    def __init__(self, trunk: Trunk, fork_depth: int, branch: Branch) -> None:
        super().__init__()
        if not 0 <= fork_depth <= trunk.depth:
            raise ValueError(f"fork depth {fork_depth} outside 0..{trunk.depth} of the trunk")
        self.trunk = trunk
        self.fork_depth = fork_depth
        self.branch = branch

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Return the task's logits: [B, C], or [B, T, C] for a tagging head."""
        d = self.fork_depth
        hidden = self.trunk(input_ids, attention_mask, token_type_ids, depths=(d,))[d]
        return self.branch(hidden, attention_mask)
