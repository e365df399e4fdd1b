"""Bring your own teacher: a team's fine-tuned transformers classifier (a folder, or a Hub
id resolved offline-aware through huggingface_hub's cache) distilled into a branch.

The teacher replaces the teacher search: it runs whole, on its own weights (fully or
partly fine-tuned), to give the training split's soft targets and its dev score; then the
same student search as onboarding from data (:func:`~mtreg.training.stages.student_search`:
the same rule, tolerance and sizes) distils it, at every fork depth N − L a teacher search
would try (L in :func:`~mtreg.training.stages.teacher_sizes`), with up to L student layers
at depth N − L. The teacher must speak the trunk's language: the same tokenizer and
architecture (refused otherwise, with the reason), and the task's head kind and labels in
the task's order.

Why every depth, and what is cached. A teacher searched from data forks at its own depth
and leaves the trunk below it untouched, so its students fork there too. A fully
fine-tuned teacher has no fork: it changed its embeddings and every layer. A student,
though, is a branch of the bundle, and a branch reads the shared frozen trunk's hidden
state at its depth, never the teacher's; so the cached activations are the trunk's at each
candidate depth (the entries onboarding from data caches, one trunk pass for all), while
the teacher runs whole once for its soft targets, which do not depend on the depth. A
student at depth k starts from the teacher's layers k.. and classifier, which were tuned
on the teacher's own state at k and now read the trunk's. A shallow fork reads a state
closer to the one they were tuned on (fewer fine-tuned layers below it) but must compress
more of the teacher's layers into l; a deep one compresses fewer, from a state further
off. Which wins differs by task and teacher, so no depth is chosen in advance: the search
tries each one at each l, smallest students first.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mtreg.artifacts.fingerprint import tensor_group_hash
from mtreg.artifacts.hf_model import Classifier, read_classifier
from mtreg.artifacts.hub import resolve
from mtreg.errors import InvalidCheckpoint, MtregError
from mtreg.nn.layers import Branch
from mtreg.nn.network import Standalone, Trunk
from mtreg.training.cache import cache_key
from mtreg.training.data import Encoded, collate
from mtreg.training.job import Job
from mtreg.training.loop import score
from mtreg.training.stages import (
    Run,
    StageResult,
    student_search,
    student_sizes,
    teacher_sizes,
)

BATCH = 32


def resolve_teacher(job: Job, source: str | Path) -> tuple[Classifier, str]:
    """Return the teacher ``source`` names (a folder, or a Hub id through huggingface_hub's
    cache) checked against ``job`` (see :func:`load_teacher`), and its name.

    Raises:
        MtregError: as :func:`~mtreg.artifacts.hub.resolve` and :func:`load_teacher`.
    """
    name = str(source)
    return load_teacher(job, resolve(source, "teacher"), name), name


def load_teacher(job: Job, folder: Path, source: str) -> Classifier:
    """Read the classifier in ``folder`` (named ``source`` in messages) and check that it
    can teach ``job``'s task on ``job``'s trunk.

    Raises:
        MtregError: not a readable classifier, another tokenizer or architecture than the
            trunk's, another head kind, or other labels than the task's; one line each.
    """
    try:
        classifier = read_classifier(folder)
    except InvalidCheckpoint as exc:
        raise MtregError(f"teacher {source}: {exc}") from None
    theirs, ours = classifier.checkpoint.fingerprint, job.fingerprint
    trunk = job.trunk.name
    what = "architecture config" if theirs.config != ours.config else None
    if what is None and theirs.tokenizer != ours.tokenizer and not _same_tokenizer(job, folder):
        what = "tokenizer"
    if what is not None:
        raise MtregError(
            f"teacher {source} was fine-tuned from another trunk than {trunk!r}: the {what} "
            f"differs; use a teacher fine-tuned from {trunk!r}'s checkpoint"
        )
    want, have = job.spec.head, classifier.head
    if have.kind != want.kind:
        raise MtregError(
            f"teacher {source} is a {have.kind} model, task {job.spec.name!r} has a "
            f"{want.kind} head: use a teacher trained for this task"
        )
    if tuple(have.labels) != tuple(want.labels):
        raise MtregError(
            f"teacher {source} predicts labels {list(have.labels)}, task {job.spec.name!r} "
            f"has {list(want.labels)}: its id2label must list the task's labels in order"
        )
    return classifier


# Case, accents, punctuation, digits and rare words: where two tokenizers that share a
# vocabulary can still disagree (lower-casing, accent stripping, splitting).
_PROBES = ["The Café's NAÏVE résumé!", "don't stop 3.14 -- #42 @you", "Zebras x ZEBRAS qwxz"]


def _same_tokenizer(job: Job, folder: Path) -> bool:
    """Whether the teacher's tokenizer files, saved differently from the trunk's (another
    transformers version re-saves them), still give the trunk's token ids."""
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError):
        return False
    texts = [*_PROBES, *(" ".join(map(str, range(i, i + 5))) for i in (7, 1000))]
    return theirs.get_vocab() == job.tokenizer.get_vocab() and (
        theirs(texts)["input_ids"] == job.tokenizer(texts)["input_ids"]
    )


def _network(job: Job, classifier: Classifier) -> Standalone:
    """The teacher whole: its own embeddings, then all its layers as one branch."""
    c = classifier.checkpoint
    trunk = Trunk.from_tensors(c.config, c.embeddings, [])
    branch = Branch(c.config, c.config.num_hidden_layers, job.spec.head, 0.0)
    branch.load_state_dict(classifier.branch_tensors(0), strict=True)
    return Standalone(trunk, 0, branch).eval().to(job.device)


@torch.no_grad()
def teacher_outputs(job: Job, model: Standalone, encoded: Encoded, key: str) -> list[torch.Tensor]:
    """Return the teacher's logits per example of ``encoded`` (cached on disk under
    ``key``): [C], or [len, C] for a per-token head."""
    cached = job.cache.get(key)
    if cached is not None and len(cached) == len(encoded):
        return cached
    out: list[torch.Tensor] = []
    pad = job.tokenizer.pad_token_id or 0
    for start in range(0, len(encoded), BATCH):
        indices = range(start, min(start + BATCH, len(encoded)))
        batch = {k: v.to(job.device) for k, v in collate(encoded, indices, pad).items()}
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        for row, i in enumerate(indices):
            n = len(encoded.input_ids[i])
            out.append((logits[row, :n] if logits.ndim == 3 else logits[row]).float().cpu())
    job.cache.put(key, out)
    return out


def distill_from(job: Job, classifier: Classifier, source: str) -> StageResult:
    """Distil ``classifier`` into students on ``job``'s trunk by the student search of
    onboarding from data, at each fork depth N − L of the teacher sizes L (see the module).

    Returns:
        The student runs; ``best`` is the best student, ``settings["teacher"]`` the
        teacher as a run (stage ``teacher``, its layers, its dev metrics, no training).

    Raises:
        MtregError: a teacher size above N, or student sizes no depth has room for.
    """
    started = time.perf_counter()
    n = job.config.num_hidden_layers
    sizes = teacher_sizes(job)
    student_sizes(job.settings, max(sizes))  # refused before the teacher runs
    model = _network(job, classifier)
    weights = tensor_group_hash(classifier.tensors)
    key = {"weights": weights, "head": classifier.head.kind, "max_length": job.max_length}
    dev = teacher_outputs(job, model, job.dev, cache_key(split="dev", data=job.data_key, **key))
    train_key = cache_key(split="train", data=job.data_key, **key)
    train = teacher_outputs(job, model, job.train, train_key)
    teacher = Run(
        stage="teacher",
        layers=n,
        fork_depth=0,
        lr=0.0,
        epochs=0,
        best_epoch=0,
        dev_metrics=score(job.spec.head, dev, job.dev.labels, job.metrics),
        seconds=time.perf_counter() - started,
        key=cache_key(teacher=weights),
    )
    job.say(f"teacher {source}: dev {job.metrics[0]} {teacher.dev_metrics[job.metrics[0]]:.4f}")

    def student(depth: int, layers: int) -> Branch:
        tensors = classifier.branch_tensors(depth)
        branch = Branch(job.config, layers, job.spec.head, job.settings.dropout, depth)
        state = branch.state_dict()
        branch.load_state_dict({k: tensors[k] for k in state}, strict=True)
        # The layers below the fork are the trunk's: so is DeBERTa's relative table.
        branch.take_from_trunk(job.component(job.trunk.objects["embeddings"]), None)
        return branch

    depths = {n - size: size for size in sizes}  # up to L layers above depth N − L
    result = student_search(job, teacher, train, depths, student)
    result.settings["teacher"] = {**teacher.to_dict(), "source": source}
    return result
