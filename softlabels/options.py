"""Every command's options, declared once, and the config objects they fill.

Each option is a dataclass field made by ``option()`` (or ``argument()``): its flag, default, help
and value checks live there and nowhere else. From the fields, ``softlabels.cli`` builds the typer
commands (so ``--help`` shows every default), ``validate`` checks values and names the flag in its
one-line error, and ``flag_of`` gives the flag a message should name (a fingerprint difference, a
resume mismatch). A leaf module: values only, no torch, no engines.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .distributed import distributed_env
from .errors import UserError

__all__ = [
    "OptionSpec",
    "option",
    "argument",
    "spec_of",
    "flag_of",
    "validate",
    "GenerateConfig",
    "TrainConfig",
    "InspectConfig",
    "SelectConfig",
    "DirectoryConfig",
    "VerifyConfig",
    "InitStudentConfig",
    "LOGPROB_DTYPES",
    "DEFAULT_LOGPROB_DTYPE",
    "TAIL_MODES",
    "TARGET_KINDS",
    "DEFAULT_SAMPLES",
    "MAX_SAMPLES",
]

LOGPROB_DTYPES = ("bfloat16", "float16", "uint8")
DEFAULT_LOGPROB_DTYPE = "bfloat16"
TAIL_MODES = ("bucket", "renorm", "uniform")
TARGET_KINDS: list[str] = ["topk", "sample"]
"""``--targets`` choices: the registered target kinds (``softlabels.targets.register`` adds to it)."""
DEFAULT_SAMPLES = 12
"""Draws per position of ``--targets sample`` (the paper's figure: about 12 gave full-KD quality)."""
MAX_SAMPLES = 65535
"""Most draws per position: counts are stored as uint16 above 255."""
SPEC_HELP = ("path/model.pt2 (torch.export), package.module:factory[@weights.safetensors|.pt], or hf:DIR "
             "(a local transformers directory, or one holding a .gguf; extra [hf])")


@dataclass(frozen=True)
class OptionSpec:
    """How one config field appears on the command line.

    Attributes:
        flag: ``--name``; None for a positional argument.
        help: one line; the default is appended by the CLI.
        metavar: the placeholder in ``--help`` (ARGUMENT names for positionals).
        shown_default: the default as ``--help`` shows it when the field's own default does not say
            it (None meaning "auto", a computed value).
        choices: the allowed values.
        minimum: the smallest allowed number (inclusive), or ``above`` for an exclusive bound.
        negatable: a boolean with ``--x/--no-x`` forms.
        hidden: kept for scripts, not shown in ``--help``.
    """

    flag: str | None
    help: str
    metavar: str | None = None
    shown_default: str | None = None
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    above: float | None = None
    maximum: float | None = None
    negatable: bool = False
    hidden: bool = False
    short: str | None = None


def option(default: Any, flag: str, help: str, **spec: Any) -> Any:
    """A config field that is the option ``flag``."""
    metadata = {"option": OptionSpec(flag, help, **spec)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def argument(help: str, metavar: str, required: bool = True, many: bool = False) -> Any:
    """A positional config field: one value, or a list of values with ``many``."""
    metadata = {"option": OptionSpec(None, help, metavar=metavar), "required": required}
    return field(default_factory=list, metadata=metadata) if many else field(default=None, metadata=metadata)


def spec_of(config: Any, name: str) -> OptionSpec:
    for item in dataclasses.fields(config):
        if item.name == name and "option" in item.metadata:
            return item.metadata["option"]
    raise KeyError(name)


def flag_of(config: Any, name: str) -> str:
    """The flag of field ``name`` (the METAVAR of a positional argument)."""
    spec = spec_of(config, name)
    return spec.flag or spec.metavar or name.upper()


def _describe(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def validate(config: Any) -> None:
    """Check every option's value against its declaration.

    Raises:
        UserError: naming the flag, the allowed values or bound, and the value given.
    """
    for item in dataclasses.fields(config):
        spec: OptionSpec | None = item.metadata.get("option")
        if spec is None:
            continue
        value = getattr(config, item.name)
        flag = flag_of(config, item.name)
        if item.metadata.get("required") and not value:
            raise UserError(f"missing {flag}")
        values = value if isinstance(value, list) else [value]
        for one in values:
            if one is None:
                continue
            if spec.choices is not None and one not in spec.choices:
                raise UserError(f"{flag} must be one of {', '.join(spec.choices)}, got {one!r}")
            if isinstance(one, (int, float)) and not isinstance(one, bool):
                if isinstance(one, float) and not math.isfinite(one):
                    raise UserError(f"{flag} must be a finite number, got {one}")
                if spec.minimum is not None and one < spec.minimum:
                    raise UserError(f"{flag} must be at least {_describe(spec.minimum)}, got {_describe(one)}")
                if spec.above is not None and not one > spec.above:
                    raise UserError(f"{flag} must be greater than {_describe(spec.above)}, got {_describe(one)}")
                if spec.maximum is not None and one > spec.maximum:
                    raise UserError(f"{flag} must be at most {_describe(spec.maximum)}, got {_describe(one)}")


@dataclass
class GenerateConfig:
    """Settings of one ``generate`` run; validates itself and names the offending flag."""

    corpus: list[str] = argument("Parquet files, directories (searched recursively) or globs; JSONL files.", "CORPUS", many=True)
    teachers: list[str] = option([], "--teacher", f"Teacher SPEC: {SPEC_HELP}; repeat for an ensemble.", metavar="SPEC", shown_default="required")
    out: str = option(None, "--out", "Output directory or store URI (s3://, gs://, ...); resumed if it holds the same run.", metavar="DIR", shown_default="required")
    input_column: str = option("inputs", "--input-column", "Column fed to the teacher: number / fixed_size_list -> model(x); list<...> -> model(x, lengths).")
    id_column: str | None = option(None, "--id-column", "Sample id column; duplicates are an error.", shown_default="<corpus file>#<row>")
    label_column: str | None = option(None, "--label-column", "Hard-label column passed through for train-student.", shown_default="none")
    text_column: str | None = option(None, "--text-column", "Raw text column: documents tokenized and cut into --max-length windows, ids stored as input_ids.", shown_default="none")
    chat_column: str | None = option(None, "--chat-column", "Chat column (list of {role, content}): the chat template applied, targets at assistant positions only.", shown_default="none")
    max_length: int = option(2048, "--max-length", "Most tokens per window of a --text-column / --chat-column document.", minimum=2)
    tokenizer: str | None = option(None, "--tokenizer", "Tokenizer hf:DIR for --text-column / --chat-column.", metavar="SPEC", shown_default="the hf: teacher's")
    pack: bool = option(False, "--pack", "Join a unit's documents (EOS between) into full windows.", negatable=True)
    audio_column: str | None = option(None, "--audio-column", "Audio column (HF Audio struct, bytes, or a path relative to the corpus file): "
                                      "decoded, mixed to mono, resampled to the teacher's sample_rate; one position per teacher frame "
                                      "(extra [audio]).", shown_default="none")
    batch_seconds: float | None = option(None, "--batch-seconds", "With --audio-column (whose utterances are batched by length): at most "
                                         "this many padded seconds of audio per batch, besides --batch-size rows.", above=0.0,
                                         shown_default="no cap")
    batch_positions: int | None = option(None, "--batch-positions", "Ragged tokens or frames (list columns, text windows): batch a unit's "
                                         "rows by length, at most this many padded positions per batch besides --batch-size rows; "
                                         "shards keep corpus order.", minimum=1, shown_default="corpus order")
    on_bad_audio: str = option("error", "--on-bad-audio", "With --audio-column: error names an undecodable, empty or truncated row; "
                               "skip drops it and records its id in the manifest.", choices=("error", "skip"))
    targets: str = option("topk", "--targets", "topk: the k most probable classes per position; sample: N draws from the teacher, "
                          "unbiased targets for the RS-KD loss.", choices=TARGET_KINDS)
    top_k: int | None = option(None, "--top-k", "Classes stored per position (--targets topk).", minimum=1, shown_default="20, or V if smaller")
    samples: int | None = option(None, "--samples", "Draws per position, with replacement (--targets sample).", minimum=1,
                                 maximum=MAX_SAMPLES, shown_default=f"{DEFAULT_SAMPLES} with --targets sample")
    proposal_temperature: float | None = option(None, "--proposal-temperature", "Draw from the teacher at this temperature "
                                                "(--targets sample); the loss reweights the draws.", above=0.0,
                                                shown_default="1: the teacher itself")
    ensemble: str = option("probs", "--ensemble", "probs: log of the mean probability; logprobs: renormalised mean log-probability.", choices=("probs", "logprobs"))
    batch_size: int = option(64, "--batch-size", "Rows per teacher batch; batches never cross units.", minimum=1)
    rows_per_shard: int | None = option(None, "--rows-per-shard", "Rows per unit (one shard, the resume granularity).", minimum=1,
                                        shown_default="auto: about 2^21 positions, 64..65,536 rows")
    device: str = option("auto", "--device", "Teacher device.", choices=("auto", "cpu", "cuda"))
    precision: str = option("fp32", "--precision", "Teacher compute: fp32, or bf16 autocast (top-k always in fp32).", choices=("fp32", "bf16"))
    on_nonfinite: str = option("error", "--on-nonfinite", "error names rows with NaN/+Inf logits; skip drops and counts them.", choices=("error", "skip"))
    logprob_dtype: str = option(DEFAULT_LOGPROB_DTYPE, "--logprob-dtype", "Log-prob storage: bfloat16 (every client reads it), float16 (not Spark) or uint8 codes.", choices=LOGPROB_DTYPES)
    progress: bool = option(True, "--progress", "Progress bar on stderr.", negatable=True)
    engine: str = option("local", "--engine", "local (this process) or ray (a Ray actor pool; extra [ray]).", choices=("local", "ray"))
    ray_address: str | None = option(None, "--ray-address", "Ray cluster to join.", shown_default="$RAY_ADDRESS, else a local Ray")
    ray_actors: int | None = option(None, "--ray-actors", "Teacher actors.", minimum=1, shown_default="one per GPU of the cluster, else 1")

    def __post_init__(self) -> None:
        self.out = os.fspath(self.out) if self.out is not None else None  # type: ignore[assignment]
        self.corpus = [os.fspath(c) for c in self.corpus]
        validate(self)
        if not self.teachers:
            raise UserError("--teacher is required (repeat it for an ensemble)")
        if self.out is None:
            raise UserError("--out is required")
        if self.text_column is not None and self.chat_column is not None:
            raise UserError("--text-column and --chat-column exclude each other: a corpus is raw text or chat")
        if self.audio_column is not None and (self.text_column is not None or self.chat_column is not None):
            raise UserError("--audio-column excludes --text-column and --chat-column: a corpus is audio, raw text or chat")
        if self.audio_column is not None and self.batch_positions is not None:
            raise UserError("--batch-positions does not apply to --audio-column: audio is batched by length with --batch-seconds")
        if self.audio_column is None:
            for name in ("batch_seconds", "on_bad_audio"):
                if getattr(self, name) not in (None, "error"):
                    raise UserError(f"{flag_of(self, name)} needs --audio-column")
        if self.text_column is None and self.chat_column is None:
            for name in ("tokenizer", "pack"):
                if getattr(self, name):
                    raise UserError(f"{flag_of(self, name)} needs --text-column or --chat-column")
        elif self.label_column is not None:
            raise UserError("--label-column does not apply to --text-column / --chat-column: the hard labels are the next tokens")
        if self.engine != "ray":
            for name in ("ray_address", "ray_actors"):
                if getattr(self, name) is not None:
                    raise UserError(f"{flag_of(self, name)} needs --engine ray")
        if self.targets == "sample":
            if self.top_k is not None:
                raise UserError("--top-k does not apply to --targets sample, which stores --samples draws per position")
            self.samples = DEFAULT_SAMPLES if self.samples is None else self.samples
            self.proposal_temperature = 1.0 if self.proposal_temperature is None else float(self.proposal_temperature)
        else:
            for name in ("samples", "proposal_temperature"):
                if getattr(self, name) is not None:
                    raise UserError(f"{flag_of(self, name)} needs --targets sample (--targets topk stores the --top-k most probable classes)")


RESUME_SETTINGS = ("data", "mix", "student", "epochs", "max_steps", "batch_size", "lr", "weight_decay", "warmup_steps",
                   "temperature", "alpha", "tail", "label_column", "seed", "num_workers", "grad_clip", "precision",
                   "world_size", "online_teacher")


@dataclass
class TrainConfig:
    """Settings of one ``train-student`` run; validates itself and names the offending flag."""

    data: list[str] = argument("Sealed soft-label directories or store URIs (or use --data).", "DATA_DIR", required=False, many=True)
    student: str = option(None, "--student", f"Student SPEC: {SPEC_HELP}; hf:DIR with weights (safetensors or .gguf) starts from them, a config.json alone trains from scratch.", metavar="SPEC", shown_default="required")
    out: str = option(None, "--out", "Output directory or store URI: checkpoint.pt, metrics.jsonl, student.safetensors.", metavar="DIR", shown_default="required")
    extra_data: list[str] = option([], "--data", "Another soft-label directory to mix in; repeatable.", metavar="DIR", shown_default="none")
    mix: str | None = option(None, "--mix", "Sampling weights of the data directories, e.g. 0.7,0.3.", shown_default="equal")
    epochs: int = option(1, "--epochs", "Passes over the data (unless --max-steps).", minimum=1)
    max_steps: int | None = option(None, "--max-steps", "Optimizer steps; overrides --epochs.", minimum=1, shown_default="from --epochs")
    batch_size: int = option(32, "--batch-size", "Rows per step (per rank).", minimum=1)
    lr: float = option(1e-3, "--lr", "Peak AdamW learning rate.", above=0.0)
    weight_decay: float = option(0.01, "--weight-decay", "AdamW weight decay.", minimum=0.0)
    warmup_steps: int | None = option(None, "--warmup-steps", "Linear warmup steps.", minimum=0, shown_default="5% of the steps")
    temperature: float = option(2.0, "--temperature", "KD temperature T (the loss is scaled by T^2).", above=0.0)
    alpha: float = option(0.5, "--alpha", "Weight of the KD loss; 1 - alpha weighs hard-label CE.", minimum=0.0, maximum=1.0)
    tail: str = option("bucket", "--tail", "How the mass beyond the top-k enters the KD loss.", choices=TAIL_MODES)
    label_column: str | None = option(None, "--label-column", "Hard-label column.", shown_default="the one generate passed through")
    eval: str | None = option(None, "--eval", "A soft-label directory to evaluate on (checked before step 1).", metavar="DIR", shown_default="none")
    eval_every: int | None = option(None, "--eval-every", "Evaluate every N steps.", minimum=1, shown_default="at the end")
    seed: int = option(0, "--seed", "Seed of the data order and the initialisation.")
    resume: bool = option(False, "--resume", "Continue from OUT/checkpoint.pt.")
    checkpoint_every: int = option(100, "--checkpoint-every", "Steps between checkpoints.", minimum=1)
    log_every: int = option(10, "--log-every", "Steps between metrics lines.", minimum=1)
    num_workers: int = option(0, "--num-workers", "DataLoader worker processes.", minimum=0)
    grad_clip: float = option(1.0, "--grad-clip", "Max gradient norm; 0 disables.", minimum=0.0)
    precision: str = option("fp32", "--precision", "Student compute: fp32 or bf16 autocast.", choices=("fp32", "bf16"))
    device: str = option("auto", "--device", "Training device.", choices=("auto", "cpu", "cuda"))
    halt_after: int | None = option(None, "--halt-after", "Checkpoint and stop after this step, as a preempted job would.", minimum=1, shown_default="none")
    online_teacher: str | None = option(None, "--online-teacher", "Online KD on full logits of this teacher SPEC (the comparison arm).", metavar="SPEC", shown_default="none")
    progress: bool = option(True, "--progress", "Progress bar on stderr.", negatable=True)
    world_size: int = field(default=1, init=False)
    mix_weights: list[float] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.data = [os.fspath(d) for d in self.data] + [os.fspath(d) for d in self.extra_data]
        self.extra_data = []
        self.out = os.fspath(self.out) if self.out is not None else None  # type: ignore[assignment]
        self.eval = os.fspath(self.eval) if self.eval is not None else None
        validate(self)
        if not self.data:
            raise UserError("no DATA_DIR given (a soft-label directory from 'softlabels generate')")
        if self.student is None:
            raise UserError("--student is required")
        if self.out is None:
            raise UserError("--out is required")
        self.mix_weights = self._weights()
        self.world_size = distributed_env().world_size

    def resume_settings(self) -> dict[str, Any]:
        """The settings a ``--resume`` must share with its checkpoint (``flag_of`` names each)."""
        settings = {name: getattr(self, name) for name in RESUME_SETTINGS}
        settings["data"] = [str(d) for d in self.data]
        settings["mix"] = self.mix_weights
        return settings

    def _weights(self) -> list[float]:
        if self.mix is None:
            return [1.0 / len(self.data)] * len(self.data)
        try:
            weights = [float(w) for w in str(self.mix).split(",")]
        except ValueError:
            raise UserError(f"--mix must be comma-separated numbers, got {self.mix!r}") from None
        if len(weights) != len(self.data):
            raise UserError(f"--mix has {len(weights)} weights for {len(self.data)} data directories")
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise UserError(f"--mix weights must be non-negative and not all zero, got {self.mix}")
        total = sum(weights)
        if len(weights) > 1 and abs(total - 1.0) > 1e-6:
            raise UserError(f"--mix weights must add up to 1, got {self.mix} (sum {total:g})")
        return [w / total for w in weights]


@dataclass
class DirectoryConfig:
    """``seal``: one soft-label directory."""

    directory: str = argument("A soft-label directory or store URI.", "DIR")


@dataclass
class VerifyConfig:
    """``verify``: one soft-label directory, fully (every byte hashed) or quickly."""

    directory: str = argument("A soft-label directory or store URI.", "DIR")
    quick: bool = option(False, "--quick", "Sizes (one listing) and footers only, no hashing: seconds for 10^5 shards.")


@dataclass
class InspectConfig:
    directory: str = argument("A sealed soft-label directory or store URI.", "DIR")
    as_json: bool = option(False, "--json", "Print the figures as JSON.")
    plot: Path | None = option(None, "--plot", "Also draw the histograms into this PNG (extra [plot]).", metavar="FILE.png", shown_default="none")


@dataclass
class SelectConfig:
    directory: str = argument("A sealed soft-label directory or store URI.", "DIR")
    where: str = option(None, "--where", "SQL condition over the shard columns, e.g. 'confidence > 0.6'.", shown_default="required")
    out: str = option(None, "--out", "New directory or store URI for the kept rows (sealed, same schema).", metavar="DIR", shown_default="required")


@dataclass
class InitStudentConfig:
    """``init-student``: a same-family student started from a subset of an ``hf:`` teacher's layers."""

    teacher: str = option(None, "--teacher", "Teacher hf:DIR (a transformers directory, or one holding a .gguf).", metavar="SPEC", shown_default="required")
    out: str = option(None, "--out", "New local directory for the student: config.json, model.safetensors, init.json.", metavar="DIR", shown_default="required")
    layers: str = option("every-other", "--layers", "Teacher layers the student keeps: every-other (0, 2, 4, ...: DistilBERT's) or a list such as 0,5,11.")
    progress: bool = option(True, "--progress", "transformers' loading bars on stderr.", negatable=True)
    teacher_layers: list[int] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.out = os.fspath(self.out) if self.out is not None else None  # type: ignore[assignment]
        validate(self)
        if self.teacher is None:
            raise UserError("--teacher is required")
        if self.out is None:
            raise UserError("--out is required")
        if self.layers != "every-other":
            try:
                chosen = [int(part) for part in self.layers.split(",")]
            except ValueError:
                raise UserError(f"--layers must be every-other or comma-separated layer numbers, got {self.layers!r}") from None
            if any(index < 0 for index in chosen) or any(a >= b for a, b in zip(chosen, chosen[1:])):
                raise UserError(f"--layers must list layer numbers from 0 up, strictly increasing, got {self.layers!r}")
            self.teacher_layers = chosen
