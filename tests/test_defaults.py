"""One source of truth for defaults: CLI options leave them to the dataclass they feed, and
``--help`` shows the dataclass's value."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import click
import pytest
from click.testing import CliRunner

from mtreg.cli import onboard as onboard_cli
from mtreg.cli import serve as serve_cli
from mtreg.cli.defaults import FieldOption, field_default, given
from mtreg.cli.main import cli
from mtreg.cli.scaffold import plan_plugin
from mtreg.core.spec import TaskSpec
from mtreg.errors import MtregError
from mtreg.serving.config import ServeConfig
from mtreg.training.settings import Settings


def _field_options(group: click.Group) -> Iterator[tuple[str, FieldOption]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _field_options(command)
            continue
        for param in command.params:
            if isinstance(param, FieldOption):
                yield name, param


def _shown(value: object) -> str | None:
    if value is None:
        return None
    return ", ".join(str(item) for item in (value if isinstance(value, tuple) else (value,)))


def test_field_options_pass_none_and_show_the_dataclass_default() -> None:
    found = list(_field_options(cli))
    assert {name for name, _ in found} >= {"train", "distill", "onboard", "serve", "new-plugin"}
    for name, option in found:
        command = cli.commands[name]
        with command.make_context(name, [], resilient_parsing=True) as ctx:
            assert ctx.params[option.name] in (None, ()), (name, option.name)
            shown = option.get_help_extra(ctx).get("default")
        assert shown == _shown(option.field_default), (name, option.name)


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("onboard", ["[default: 0.99]", "[default: 32]", "[default: 3]", "[default: fp32]"]),
        ("serve", ["[default: serving]", "[default: 512; x>=1]", "[default: 64; x>=1]"]),
    ],
)
def test_help_shows_the_effective_defaults(command: str, shown: list[str]) -> None:
    result = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for text in shown:
        assert text in result.output


def test_settings_from_no_options_are_the_dataclass_defaults() -> None:
    empty = dict.fromkeys(["batch_size", "seed", "patience", "device", "precision", "tolerance"])
    assert onboard_cli._settings(**empty, teacher_lrs=(), student_lrs=()) == Settings()
    assert onboard_cli._settings(patience=0).patience is None
    assert onboard_cli._settings(patience=5, teacher_lrs=(1e-3,)) == Settings(
        patience=5, teacher_lrs=(1e-3,)
    )


def test_commands_pass_unset_options_as_the_dataclass_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mtreg.training import onboard as training

    seen: dict[str, Any] = {}

    def fake(registry: Any, task: str, settings: Settings, **kwargs: Any) -> Any:
        seen["settings"] = settings
        raise MtregError("stop here")

    monkeypatch.setattr(training, "onboard", fake)
    result = CliRunner().invoke(cli, ["onboard", "toy"])
    assert "stop here" in result.output
    assert seen["settings"] == Settings()


def test_serve_config_from_no_options_is_the_dataclass_default() -> None:
    options = dict.fromkeys(
        ["bundle", "backend", "max_batch_size", "max_wait_ms", "queue_size", "max_inputs"]
    )
    assert serve_cli._config(tasks=None, **options, poll_seconds=None) == ServeConfig()
    # A queue smaller than the default inputs per request caps them, as before.
    assert serve_cli._config(tasks=None, queue_size=10).max_inputs == 10
    assert serve_cli._config(tasks=("a",), max_inputs=100, queue_size=50).max_inputs == 50
    with pytest.raises(MtregError, match="at least 1"):
        serve_cli._config(tasks=None, max_batch_size=0)


def test_new_plugin_max_length_defaults_to_the_task_spec() -> None:
    assert plan_plugin("probe", ["a", "b"]).max_length == field_default(TaskSpec, "max_length")


def test_given_drops_unset_values_only() -> None:
    assert given(a=None, b=(), c=0, d="", e=(1,)) == {"c": 0, "d": "", "e": (1,)}


def test_field_default_names_a_missing_field() -> None:
    with pytest.raises(TypeError, match="no field 'nope'"):
        field_default(Settings, "nope")
