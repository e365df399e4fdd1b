"""``mtreg trunk add | list | show``."""

from __future__ import annotations

import click

from mtreg.cli.context import Context, pass_context
from mtreg.cli.output import echo_fields, echo_json, json_option, listing, short


@click.group()
def trunk() -> None:
    """Register and inspect trunks (the shared, frozen encoders)."""


@trunk.command("add")
@click.argument("name")
@click.argument("path", metavar="PATH_OR_HUB_ID")
@json_option
@pass_context
def add(ctx: Context, name: str, path: str, as_json: bool) -> None:
    """Register a Hugging Face checkpoint folder, or a Hub id (owner/name[@revision],
    through huggingface_hub's cache; HF_HUB_OFFLINE=1 uses the cache only), as trunk NAME.
    Families: BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ELECTRA, DeBERTa-v2/v3, ModernBERT."""
    record = ctx.registry.add_trunk(name, path)
    if as_json:
        echo_json(record.to_dict())
    else:
        click.echo(
            f"added trunk {record.name}: {record.model_type}, {record.num_layers} layers, "
            f"hidden {record.config['hidden_size']}, "
            f"fingerprint {short(record.fingerprint['embeddings'])}"
        )


@trunk.command("list")
@json_option
@pass_context
def list_(ctx: Context, as_json: bool) -> None:
    """List the registered trunks."""
    listing(
        as_json,
        ctx.registry.trunks(),
        ["NAME", "TYPE", "LAYERS", "HIDDEN", "TOKENIZER", "SOURCE"],
        lambda t: [
            t.name,
            t.model_type,
            t.num_layers,
            t.config["hidden_size"],
            short(t.fingerprint["tokenizer"]),
            t.source,
        ],
        "no trunks registered: add one with `mtreg trunk add NAME PATH`",
    )


@trunk.command("show")
@click.argument("name")
@json_option
@pass_context
def show(ctx: Context, name: str, as_json: bool) -> None:
    """Show trunk NAME: its config and fingerprint."""
    record = ctx.registry.trunk(name)
    if as_json:
        echo_json(record.to_dict())
        return
    fp = record.fingerprint
    echo_fields(
        [
            ("name", record.name),
            ("model type", record.model_type),
            ("layers", record.num_layers),
            ("hidden size", record.config["hidden_size"]),
            ("heads", record.config["num_attention_heads"]),
            ("vocab size", record.config["vocab_size"]),
            ("source", record.source),
            ("registered", record.created_at),
            ("tokenizer sha256", fp["tokenizer"]),
            ("config sha256", fp["config"]),
            ("embeddings sha256", fp["embeddings"]),
            *[(f"layer {i} sha256", h) for i, h in enumerate(fp["layers"])],
        ]
    )


COMMANDS = [trunk]
