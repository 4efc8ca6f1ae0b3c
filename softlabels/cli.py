"""The ``softlabels`` command line: a thin typed layer over the library.

Exit codes: 0 success, 1 bad usage or bad input (one line, no traceback), 2 verification failure,
130 interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import UserError, VerificationError

__all__ = ["app", "main", "run"]

try:  # newer typer vendors click as typer._click (click is then not installed at all)
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer raises click's own exceptions
    from click.exceptions import UsageError
USAGE_ERRORS = (UsageError,)

INTERRUPTED = 130

app = typer.Typer(
    name="softlabels",
    help="Offline knowledge distillation at corpus scale: top-k teacher soft labels in Parquet shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def generate(
    corpus: list[str] = typer.Argument(..., help="Parquet files, directories or globs; JSONL files."),
    teacher: list[str] = typer.Option(..., "--teacher", help="Teacher SPEC; repeat for an ensemble."),
    out: Path = typer.Option(..., "--out", help="Output directory (resumed if it holds the same run)."),
    input_column: str = typer.Option("inputs", "--input-column"),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="Sample id column (default: <file>#<row>)."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Hard-label column to pass through."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Classes stored per position [default: 20, or V if smaller]."),
    ensemble: str = typer.Option("probs", "--ensemble", help="probs (mean of probabilities) or logprobs."),
    batch_size: int = typer.Option(64, "--batch-size"),
    rows_per_shard: Optional[int] = typer.Option(None, "--rows-per-shard", help="Rows per unit (shard); default auto: about 2^21 positions (~100 MB at k=20), 64..65,536 rows."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16 teacher compute."),
    on_nonfinite: str = typer.Option("error", "--on-nonfinite", help="error or skip rows with NaN/Inf logits."),
    logprob_dtype: str = typer.Option("bfloat16", "--logprob-dtype", help="bfloat16 (read by every client), float16 (not by Spark) or uint8 (quantised codes)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray (a Ray actor pool; extra [ray])."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join [default: $RAY_ADDRESS, else a local Ray]."),
    ray_actors: Optional[int] = typer.Option(None, "--ray-actors", help="Teacher actors [default: one per GPU of the cluster, else 1]."),
) -> None:
    """Run teacher(s) over a corpus and store top-k log-probabilities in Parquet shards."""
    from .generate import GenerateConfig, generate as run_generate

    config = GenerateConfig(
        corpus=corpus, teachers=teacher, out=out, input_column=input_column, id_column=id_column,
        label_column=label_column, top_k=top_k, ensemble=ensemble, batch_size=batch_size,
        rows_per_shard=rows_per_shard, device=device, precision=precision, on_nonfinite=on_nonfinite,
        logprob_dtype=logprob_dtype,
        progress=progress, engine=engine, ray_address=ray_address, ray_actors=ray_actors,
    )
    typer.echo(run_generate(config).render())


@app.command("train-student")
def train_student(
    data_dir: Optional[list[Path]] = typer.Argument(None, help="Sealed soft-label directories (or use --data)."),
    student: str = typer.Option(..., "--student", help="Student SPEC: module:factory[@init.safetensors]."),
    out: Path = typer.Option(..., "--out", help="Output directory: checkpoint, metrics.jsonl, student.safetensors."),
    data: Optional[list[Path]] = typer.Option(None, "--data", help="Another soft-label directory to mix in; repeatable."),
    mix: Optional[str] = typer.Option(None, "--mix", help="Sampling weights of the data directories, e.g. 0.7,0.3."),
    epochs: int = typer.Option(1, "--epochs"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Overrides --epochs."),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    weight_decay: float = typer.Option(0.01, "--weight-decay"),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="[default: 5% of the steps]"),
    temperature: float = typer.Option(2.0, "--temperature"),
    alpha: float = typer.Option(0.5, "--alpha", help="Weight of the KD loss; 1 - alpha weighs hard-label CE."),
    tail: str = typer.Option("bucket", "--tail", help="bucket, renorm or uniform."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="[default: the one passed through by generate]"),
    eval_dir: Optional[Path] = typer.Option(None, "--eval", help="A soft-label directory to evaluate on."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every"),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.pt."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every"),
    log_every: int = typer.Option(10, "--log-every"),
    num_workers: int = typer.Option(0, "--num-workers", help="DataLoader worker processes."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Max gradient norm; 0 disables."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16 autocast."),
    device: str = typer.Option("auto", "--device"),
    halt_after: Optional[int] = typer.Option(None, "--halt-after", help="Checkpoint and stop after this step (preemption)."),
    online_teacher: Optional[str] = typer.Option(None, "--online-teacher", help="Online KD: run this teacher in the loop on full logits (for comparison)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Distil a student from soft-label shards (KD + hard-label CE), resumable, DDP under torchrun."""
    from .train import TrainConfig, train_student as run_train

    weights = None
    if mix is not None:
        try:
            weights = [float(w) for w in mix.split(",")]
        except ValueError:
            raise UserError(f"--mix must be comma-separated numbers, got {mix!r}") from None
    config = TrainConfig(
        data=list(data_dir or []) + list(data or []), student=student, out=out, mix=weights, epochs=epochs,
        max_steps=max_steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
        temperature=temperature, alpha=alpha, tail=tail, label_column=label_column, eval=eval_dir,
        eval_every=eval_every, seed=seed, resume=resume, checkpoint_every=checkpoint_every, log_every=log_every,
        num_workers=num_workers, grad_clip=grad_clip, precision=precision, device=device, halt_after=halt_after,
        online_teacher=online_teacher, progress=progress,
    )
    typer.echo(run_train(config).render())


@app.command()
def verify(directory: Path = typer.Argument(..., help="A soft-label directory.")) -> None:
    """Check completeness, schema, row counts and every shard's sha256 (exit 2 on failure)."""
    from .verify import verify as run_verify

    typer.echo(run_verify(directory).render())


@app.command()
def seal(directory: Path = typer.Argument(..., help="A generate output whose ranks all committed their units.")) -> None:
    """Write the manifest of a multi-rank run nobody sealed, from its journals; runs no teacher (exit 2 if units are missing)."""
    from .seal import seal as run_seal

    typer.echo(run_seal(directory).render())


@app.command()
def select(
    directory: Path = typer.Argument(..., help="A sealed soft-label directory."),
    where: str = typer.Option(..., "--where", help="SQL condition over the shard columns, e.g. 'confidence > 0.6'."),
    out: Path = typer.Option(..., "--out", help="New directory for the kept rows (sealed, same schema)."),
) -> None:
    """Keep the rows that meet --where in a new sealed directory, without re-running the teacher."""
    from .select import select as run_select

    typer.echo(run_select(directory, where, out).render())


@app.command()
def inspect(
    directory: Path = typer.Argument(..., help="A sealed soft-label directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the histograms into this PNG (needs matplotlib: the plot extra)."),
) -> None:
    """Rows, positions, bytes, captured top-k mass, confidence, entropy, agreement, top-1 classes."""
    from .inspect import inspect as run_inspect, render, to_json

    if plot is not None:  # refused before any work: no matplotlib, or nowhere to write
        from .plot import check_plot_path, require_matplotlib, save_plot

        require_matplotlib()
        check_plot_path(plot)
    report = run_inspect(directory)
    if plot is not None:
        save_plot(report, plot)
    typer.echo(to_json(report) if as_json else render(report) + (f"\nhistograms: {plot}" if plot is not None else ""))


def main(argv: list[str] | None = None) -> int:
    """Console entry point; maps errors to exit codes without tracebacks."""
    try:
        # typer turns Ctrl-C into exit code 130 and, outside standalone mode, returns exit codes
        status = app(args=argv, standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except VerificationError as exc:
        print(f"verification failed: {exc}", file=sys.stderr)
        return 2
    except USAGE_ERRORS as exc:
        print(f"error: {exc.format_message()}" + (f" (see 'softlabels {exc.ctx.info_name} --help')" if exc.ctx else ""), file=sys.stderr)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        status = INTERRUPTED
    if status == INTERRUPTED:
        print("interrupted: committed shards are kept; rerun the same command to resume", file=sys.stderr)
    return status if isinstance(status, int) else 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
