"""Every encoder family mtreg serves, from a tiny random config built here (no hub):
parity with transformers' own classifiers at every fork depth, the compatibility rule,
merged == standalone, ONNX and transformers exports, and `mtreg trunk add` + onboarding.

Each case is parametrised over the families of ``factories.FAMILIES``; the README's parity
table cites these tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import FAMILIES, VOCAB, Checkpoints, family_config, set_tensor
from helpers import publish_tasks
from toy import FLAGS, PLUGIN

from mtreg.artifacts.checkpoint import read_checkpoint
from mtreg.artifacts.hf_model import read_classifier
from mtreg.cli.main import cli
from mtreg.core.spec import HeadSpec
from mtreg.errors import InvalidCheckpoint
from mtreg.nn.layers import Branch
from mtreg.nn.network import Standalone, Trunk
from mtreg.registry.api import Registry
from mtreg.runtime.bundle import load_bundle
from mtreg.runtime.export import export_hf, export_onnx

TOL, ONNX_TOL = 1e-5, 1e-4
# (task, head, fork depth, branch layers, inputs) on a 2-layer trunk: forks at 0, 1 and 2.
TASKS = [
    ("sentiment", ("classification", ("neg", "pos")), 1, 1, ("text",)),
    ("slots", ("tagging", ("O", "B-x", "I-x")), 0, 2, ("text",)),
    ("score", ("regression", ()), 2, 0, ("text",)),
]
TEXTS = ["the movie was great", "i want a refund for my order now please", "what"]


def _batch(seed: int, lengths: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(VOCAB), (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids.masked_fill(mask == 0, pad), mask


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def bundle_setup(family: str, checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory):
    """A registry on a 2-layer random trunk of ``family`` with TASKS registered."""
    tmp = tmp_path_factory.mktemp(family)
    folder = checkpoints.copy(tmp / "trunk", num_layers=2, model_type=family)
    checkpoint = read_checkpoint(folder)
    registry = Registry(url=f"sqlite:///{tmp / 'r.db'}", home=tmp / "home")
    registry.plugins_dirs = (tmp / "plugins",)
    registry.add_trunk("tiny", folder)
    files = publish_tasks(tmp, checkpoint, TASKS, dict.fromkeys([t[0] for t in TASKS], "1.0.0"))
    registry.discover(refresh=True)
    registry.register(all=True)
    yield tmp, checkpoint, registry, files
    registry.close()


@pytest.mark.parametrize("kind", ["SequenceClassification", "TokenClassification"])
def test_branches_reproduce_transformers_classifiers_at_every_fork(
    family: str, kind: str, tmp_path: Path
) -> None:
    check_classifier_parity(family, kind, tmp_path)


def test_modernbert_mean_pooling_reproduces_transformers(tmp_path: Path) -> None:
    check_classifier_parity(
        "modernbert", "SequenceClassification", tmp_path, classifier_pooling="mean"
    )


def check_classifier_parity(family: str, kind: str, tmp_path: Path, **options) -> None:
    """A random transformers classifier of ``family`` equals mtreg's trunk + branch read
    from its folder, at every fork depth (padding positions aside)."""
    import transformers

    config = family_config(family, num_layers=2, num_labels=3, initializer_range=0.2, **options)
    torch.manual_seed(0)
    model = getattr(transformers, f"AutoModelFor{kind}").from_config(config).eval()
    with torch.no_grad():  # norms away from (1, 0), so that a misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(tmp_path)
    classifier = read_classifier(tmp_path)
    assert classifier.head == HeadSpec(
        "tagging" if kind == "TokenClassification" else "classification",
        ("LABEL_0", "LABEL_1", "LABEL_2"),
    )
    c = classifier.checkpoint
    ids, mask = _batch(1, [9, 4, 7, 1], c.config.pad_token_id)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool() if kind == "TokenClassification" else slice(None)
    for depth in range(3):
        trunk = Trunk.from_tensors(c.config, c.embeddings, c.layers[:depth])
        branch = Branch(c.config, 2 - depth, classifier.head, fork_depth=depth)
        branch.load_state_dict(classifier.branch_tensors(depth), strict=True)
        with torch.no_grad():
            ours = Standalone(trunk, depth, branch).eval()(ids, mask)
        assert (ours[keep] - expected[keep]).abs().max().item() <= TOL, f"fork depth {depth}"


def test_the_compatibility_rule_holds_per_family(
    family: str, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    folder = checkpoints.copy(tmp_path / "t", num_layers=2, model_type=family)
    checkpoint = read_checkpoint(folder)
    before = checkpoint.fingerprint
    name = sorted(checkpoint.layers[1])[0]
    layer1 = f"{checkpoint.config.family.layer_prefix}1.{name}"  # AutoModel: no base prefix
    changed = checkpoint.layers[1][name] + 0.5
    set_tensor(folder / "model.safetensors", layer1, changed)
    after = read_checkpoint(folder).fingerprint
    assert after.first_mismatch(before.prefix(1)) is None  # layer 1 is above a depth-1 fork
    assert "layer 1" in after.first_mismatch(before.prefix(2))


def test_merged_bundle_equals_each_task_alone(bundle_setup) -> None:
    _, checkpoint, registry, files = bundle_setup
    bundle = load_bundle(registry.bundle_path("latest"))
    from mtreg.artifacts.branch_file import read_branch

    for task in bundle.tasks:
        batch = bundle.encode(TEXTS, bundle.info[task])["batch"]
        args = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        meta, tensors = read_branch(files[task], checkpoint.config)
        trunk = Trunk.from_tensors(
            checkpoint.config, checkpoint.embeddings, checkpoint.layers[: meta.fork_depth]
        )
        branch = Branch(checkpoint.config, meta.num_layers, meta.head, fork_depth=meta.fork_depth)
        branch.load_state_dict(tensors, strict=True)
        with torch.no_grad():
            merged = bundle.model(*args, tasks=[task])[task]
            alone = Standalone(trunk, meta.fork_depth, branch).eval()(*args)
        assert (merged - alone).abs().max().item() <= TOL, task


@pytest.mark.slow
def test_onnx_export_matches_torch_at_another_length(bundle_setup) -> None:
    tmp, _, registry, _ = bundle_setup
    out = tmp / "onnx"
    report = export_onnx(registry.bundle_path("latest"), out)
    assert report["max_abs_diff"] <= ONNX_TOL
    import onnxruntime

    torch_bundle = load_bundle(registry.bundle_path("latest"))
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    inputs = {i.name for i in session.get_inputs()}
    # A batch longer and larger than the probe the graph was traced with.
    texts = [*TEXTS, "not good , very slow and the food was awful but the price was fine " * 2]
    batch = torch_bundle.encode(texts, torch_bundle.info["sentiment"])["batch"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    types = batch.get("token_type_ids", torch.zeros_like(ids))
    feeds = {
        "input_ids": ids.numpy(),
        "attention_mask": mask.numpy(),
        "token_type_ids": types.numpy(),
    }
    feeds = {k: v for k, v in feeds.items() if k in inputs}
    outputs = dict(zip(report["outputs"], session.run(None, feeds), strict=True))
    with torch.no_grad():
        expected = torch_bundle.model(ids, mask, types)
    for task, logits in expected.items():
        assert (torch.as_tensor(outputs[task]) - logits).abs().max().item() <= ONNX_TOL, task


@pytest.mark.parametrize("task", ["sentiment", "slots"])
def test_hf_export_gives_the_same_logits_in_transformers(bundle_setup, task: str) -> None:
    import transformers

    tmp, _, registry, _ = bundle_setup
    out = export_hf(registry.bundle_path("latest"), tmp / f"hf-{task}", task)
    bundle = load_bundle(registry.bundle_path("latest"), tasks=[task])
    batch = bundle.encode(TEXTS, bundle.info[task])["batch"]
    kind = "TokenClassification" if task == "slots" else "SequenceClassification"
    model = getattr(transformers, f"AutoModelFor{kind}").from_pretrained(out).eval()
    assert model.config.model_type == bundle.config.model_type
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ours = bundle.model(ids, mask, batch.get("token_type_ids"))[task]
        theirs = model(
            **{
                k: v
                for k, v in batch.items()
                if k != "token_type_ids" or bundle.config.type_vocab_size
            }
        ).logits
    keep = mask.bool() if task == "slots" else slice(None)
    assert (ours[keep] - theirs[keep]).abs().max().item() <= TOL


@pytest.mark.slow
def test_trunk_add_and_a_tiny_onboard_through_the_cli(
    family: str, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    folder = checkpoints.copy(tmp_path / "trunk", num_layers=2, model_type=family)
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "toyplug.py").write_text(PLUGIN)
    base = ["--home", str(tmp_path / "home"), "--plugins-dir", str(tmp_path / "plugins")]
    runner = CliRunner()
    assert runner.invoke(cli, [*base, "init"]).exit_code == 0
    added = runner.invoke(cli, [*base, "trunk", "add", "tiny", str(folder), "--json"])
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["model_type"] == family
    result = runner.invoke(cli, [*base, "onboard", "toy", *FLAGS, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["changes"]["tasks"][0]["change"] == "added"
    assert report["chosen"]["dev_metrics"]["accuracy"] > 0.5
    predicted = runner.invoke(cli, [*base, "predict", "--bundle", "latest", "a great film"])
    assert predicted.exit_code == 0, predicted.output


def test_an_unsupported_family_option_is_one_line(checkpoints: Checkpoints, tmp_path: Path) -> None:
    folder = checkpoints.copy(tmp_path / "t", num_layers=2, model_type="deberta-v2")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "conv_kernel_size": 3}))
    with pytest.raises(InvalidCheckpoint, match="conv_kernel_size") as info:
        read_checkpoint(folder)
    assert "\n" not in str(info.value)
