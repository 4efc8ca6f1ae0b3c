"""The ``softlabels`` command line, generated from the config dataclasses of ``softlabels.options``.

Each command is a config class and a function that runs it: the typer parameters (flags, defaults,
help) come from the config's fields, so an option is declared once. Exit codes: 0 success, 1 bad
usage or bad input (one line, no traceback), 2 verification failure, 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from . import __version__
from .errors import UserError, VerificationError
from .options import DirectoryConfig, GenerateConfig, InitStudentConfig, InspectConfig, OptionSpec, SelectConfig, TrainConfig, VerifyConfig

__all__ = ["app", "main", "run"]

try:  # newer typer vendors click as typer._click (click is then not installed at all)
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer raises click's own exceptions
    from click.exceptions import NoArgsIsHelpError, UsageError

INTERRUPTED = 130
CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="softlabels",
    help="Offline knowledge distillation at corpus scale: teacher soft labels in Parquet shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts hold [brackets] and defaults that markup would swallow
    context_settings=CONTEXT,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"softlabels {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", "-V", help="Print the version and exit.", callback=_version, is_eager=True)] = False) -> None:
    """Offline knowledge distillation at corpus scale: teacher soft labels in Parquet shards."""


@dataclass(frozen=True)
class Command:
    """One CLI command: its config class, what runs it, and how a Ctrl-C'd run is resumed."""

    name: str
    config: type
    run: Callable[[Any], str]
    summary: str
    resume_advice: str


def _parameter(item: dataclasses.Field, annotation: Any) -> inspect.Parameter:
    spec: OptionSpec = item.metadata["option"]
    if item.default is not dataclasses.MISSING:
        default = item.default
    elif item.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = item.default_factory()  # type: ignore[misc]
    else:
        default = None
    if spec.flag is None:
        required = item.metadata.get("required", True)
        info: Any = typer.Argument(help=spec.help, metavar=spec.metavar, show_default=False)
        annotation = annotation if required else Optional[annotation]
        default = ... if required else None
    else:
        names = [f"{spec.flag}/--no-{spec.flag[2:]}" if spec.negatable else spec.flag]
        if spec.short:
            names.append(spec.short)
        required = spec.shown_default == "required"
        shown: Any = spec.shown_default if spec.shown_default is not None and not required else not required
        metavar = spec.metavar or _metavar(spec, annotation)
        info = typer.Option(*names, help=spec.help, metavar=metavar, show_default=shown, hidden=spec.hidden)
        if required:
            default = ...
        elif isinstance(default, list) and not default:
            default = None
            annotation = Optional[annotation]
    return inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, info])


def _metavar(spec: OptionSpec, annotation: Any) -> str | None:
    if spec.choices:
        return "|".join(spec.choices)
    base = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
    if typing.get_origin(base) is list:
        base = typing.get_args(base)[0]
    return {int: "N", float: "X", str: "TEXT", Path: "PATH"}.get(base)


def _register(command: Command) -> None:
    hints = typing.get_type_hints(command.config)
    fields = [item for item in dataclasses.fields(command.config) if item.init and "option" in item.metadata]
    parameters = [_parameter(item, hints[item.name]) for item in fields]
    parameters.sort(key=lambda p: p.default is not ...)  # required positionals first

    def handler(**values: Any) -> None:
        settings = {}
        for item in fields:
            value = values[item.name]
            if value is None and item.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                value = item.default_factory()  # type: ignore[misc]
            settings[item.name] = value
        typer.echo(command.run(command.config(**settings)))

    handler.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    handler.__annotations__ = {p.name: p.annotation for p in parameters}
    handler.__doc__ = command.summary
    handler.__name__ = command.name.replace("-", "_")
    app.command(command.name, context_settings=CONTEXT)(handler)


def _generate(config: GenerateConfig) -> str:
    from .generate import generate

    return generate(config).render()


def _train(config: TrainConfig) -> str:
    from .train import train_student

    return train_student(config).render()


def _init_student(config: InitStudentConfig) -> str:
    from .student_init import init_student

    return init_student(config).render()


def _verify(config: VerifyConfig) -> str:
    from .verify import verify

    return verify(config.directory, quick=config.quick).render()


def _seal(config: DirectoryConfig) -> str:
    from .seal import seal

    return seal(config.directory).render()


def _select(config: SelectConfig) -> str:
    from .select import select

    return select(config.directory, config.where, config.out).render()


def _inspect(config: InspectConfig) -> str:
    from .inspect import inspect as run_inspect, render, to_json

    if config.plot is not None:  # refused before any work: no matplotlib, or nowhere to write
        from .plot import check_plot_path, require_matplotlib, save_plot

        require_matplotlib()
        check_plot_path(config.plot)
    report = run_inspect(config.directory)
    if config.plot is not None:
        save_plot(report, config.plot)
    return to_json(report) if config.as_json else render(report) + (f"\nhistograms: {config.plot}" if config.plot is not None else "")


COMMANDS = [
    Command("generate", GenerateConfig, _generate,
            "Run teacher(s) over a corpus and store top-k log-probabilities in Parquet shards.",
            "committed shards are kept; rerun the same command to resume"),
    Command("train-student", TrainConfig, _train,
            "Distil a student from soft-label shards (KD + hard-label CE); resumable, DDP under torchrun.",
            "no checkpoint was written; rerun the same command (no --resume needed)"),
    Command("init-student", InitStudentConfig, _init_student,
            "Write an hf: student made of some of an hf: teacher's layers (default every other: DistilBERT's initialisation).",
            "nothing was written to --out; rerun the same command"),
    Command("verify", VerifyConfig, _verify,
            "Check completeness, schema, row counts and every shard's sha256 (--quick: sizes and footers only; exit 2 on failure).",
            "nothing was written; rerun the same command"),
    Command("inspect", InspectConfig, _inspect,
            "Rows, positions, bytes, captured top-k mass, confidence, entropy, agreement, top-1 classes.",
            "nothing was written; rerun the same command"),
    Command("select", SelectConfig, _select,
            "Keep the rows that meet --where in a new sealed directory, without re-running the teacher.",
            "the selection is incomplete (no manifest); rerun the same command to redo it"),
    Command("seal", DirectoryConfig, _seal,
            "Write the manifest of a multi-rank run nobody sealed, from its journals; runs no teacher.",
            "nothing was sealed; rerun the same command"),
]
for _command in COMMANDS:
    _register(_command)


def _command_name(argv: list[str]) -> str | None:
    names = {command.name for command in COMMANDS}
    return next((arg for arg in argv if arg in names), None)


def _checkpoint_advice(argv: list[str]) -> str | None:
    """What is true of train-student's checkpoint in the --out named in ``argv`` after a Ctrl-C."""
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), None)
    if out is None and "--out" in argv[:-1]:
        out = argv[argv.index("--out") + 1]
    try:
        from .storage import Location

        held = out is not None and (Location.of(out) / "checkpoint.pt").is_file()
    except Exception:  # a store that cannot be reached now: say nothing we do not know
        return "rerun the same command, with --resume if --out holds a checkpoint.pt"
    return "the last checkpoint in --out is kept; rerun the same command with --resume to continue from it" if held else None


def main(argv: list[str] | None = None) -> int:
    """Console entry point; maps errors to exit codes without tracebacks."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = _command_name(argv)
    try:
        # typer turns Ctrl-C into exit code 130 and, outside standalone mode, returns exit codes
        status = app(args=argv, prog_name="softlabels", standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except VerificationError as exc:
        print(f"verification failed: {exc}", file=sys.stderr)
        return 2
    except NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help() if exc.ctx else "softlabels --help")
        return 0
    except UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        print(f"error: {exc.format_message()}{where}", file=sys.stderr)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except OSError as exc:  # last resort: an I/O fault no layer below named (storage maps its own writes)
        from .storage import os_error_reason

        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: I/O failure{where}: {os_error_reason(exc)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, typer.Abort):
        status = INTERRUPTED
    if status == INTERRUPTED:
        advice = next((c.resume_advice for c in COMMANDS if c.name == name), "rerun the same command")
        if name == "train-student":  # say what is true: there may be no checkpoint yet
            advice = _checkpoint_advice(argv) or advice
        print(f"interrupted: {advice}", file=sys.stderr)
    return status if isinstance(status, int) else 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
