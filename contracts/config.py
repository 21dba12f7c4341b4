"""The run config: one typed schema, read from YAML (`configs/*.yaml`) or seed-style JSON.

A config is the single place a hyperparameter is written. Derived quantities (gradient
accumulation, total optimizer steps) are computed here from the global batch, never set twice.

Errors are `ContractError` with one line that names the file, the key, the bad value and what is
accepted, so both CLIs can print it and exit 2.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, get_type_hints

import yaml

from contracts.errors import ContractError
from contracts.remote import is_int

SCHEMA_VERSION = 1

METHODS = ("qlora", "lora", "full")
SPLITS = ("unseen-studies", "unseen-conditions", "unseen-tasks", "unseen-participants", "random")
PARTICIPANT_FRACTION = 0.1  # the paper: unseen-participants gains level off at about 10% of a study's participants
MODEL_INITS = ("pretrained", "random")
EVAL_MODES = ("sample", "distribution")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
PRECISIONS = ("bf16", "fp16", "fp32")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flex_attention", "eager")
MEMORY_MODES = ("auto", "fast", "lean")
FP8_BACKWARDS = ("fp8", "bf16")  # train.fp8_backward: the input gradient in e4m3, or in bf16 as bnb does
REPORT_TO = ("none", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
"""Where train.report_to: tensorboard writes its event files, under the job's out/ (they come back with it)."""
OPTIMIZERS = (
    # transformers' OptimizerNames that need nothing beyond torch + bitsandbytes (the image's deps);
    # kept explicit so contracts imports neither transformers nor torch.
    "adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop",
    "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
    "lion_8bit", "lion_32bit", "paged_lion_8bit", "paged_lion_32bit",
)
SEED_MAX = 2**32 - 1
DEFAULT_SYSTEM_PROMPT = (
    "You are simulating a survey respondent. Answer exactly as instructed, following the "
    "specified response format without additional commentary."
)


@dataclass(frozen=True)
class ModelSpec:
    id: str = "Qwen/Qwen2.5-14B-Instruct"
    """Hugging Face id or local path of the base model (with `init: random`, a name for the build)."""
    init: str = "pretrained"
    """`pretrained` loads weights; `random` builds the architecture from `arch` with random weights."""
    arch: dict = field(default_factory=dict)
    """Qwen2 config fields (or `preset: qwen2.5-14b`) used when `init: random`."""
    tokenizer: str | None = None
    """Tokenizer id or path; default: the model's. `qwen2.5-offline` builds Qwen's BPE offline."""
    revision: str | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT


@dataclass(frozen=True)
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )


@dataclass(frozen=True)
class TrainSpec:
    method: str = "qlora"
    epochs: float = 1.0
    global_batch: int = 256
    """Sequences per optimizer step = micro_batch x grad accumulation x world size."""
    micro_batch: int = 8
    lr: float = 1e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    optim: str = "paged_adamw_8bit"
    precision: str = "bf16"
    max_length: int = 2048
    packing: bool = True
    """Padding-free batches (sequences concatenated, attention kept per sequence)."""
    gradient_checkpointing: bool = True
    checkpoint_layers: int | None = None
    """With gradient_checkpointing: how many decoder layers recompute (None: all; fewer = faster, more memory)."""
    liger: bool = True
    """Liger's fused RMSNorm/SwiGLU/RoPE kernels on CUDA when liger-kernel is installed (job/levers.py)."""
    attn_implementation: str = "auto"
    """auto (flex_attention on CUDA, sdpa on CPU) | sdpa | flex_attention | eager."""
    fused_lora: bool = True
    """One fused autograd op per LoRA layer (no dropout copy kept, no clone/scale/add passes;
    same function as peft's forward; job/fused_lora.py)."""
    offload_checkpoints: bool = False
    """Checkpointed layers keep their input in pinned host memory, not on the GPU (job/offload.py)."""
    fp8: bool = False
    """The frozen base's MLP matmuls (and attention's q/o with fp8_attention) in fp8 e4m3 with row-wise
    scales, forward and input gradient (job/fp8.py); off on cards without fp8 tensor cores (before
    Ada/Hopper). Rounds the matmul inputs to 3 mantissa bits: the loss stays within seed-to-seed noise."""
    fp8_fast_accum: bool = True
    """With fp8: the forward's matmul uses Hopper's fast accumulation (false: exact accumulation)."""
    fp8_backward: str = "fp8"
    """With fp8: the input gradient dx = dy @ W in fp8 | bf16 (from the dequantized weight, as bnb does;
    only the forward and its recompute in fp8). bf16 dx did not narrow fp8's loss gap and is slower."""
    fp8_attention: bool = False
    """With fp8: attention's q_proj/o_proj in fp8 too (the MLP's gate/up/down always are; k/v never).
    Off by default: faster, but its loss left the seed-to-seed noise the MLP alone stays within."""
    memory_mode: str = "auto"
    """auto: the config as written when `job check`'s fit says it fits the card, else the lean mode |
    fast: always as written | lean: always lean (every layer recomputed, its input offloaded to pinned
    host memory, the largest micro-batch up to 128 that fits card and host; job/check.py plan_memory)."""
    compile: bool = False
    """Regional torch.compile: each decoder layer compiled (one shared graph, dynamic shapes; job/levers.py)."""
    require_levers: bool = True
    """A speed lever this config turns on (liger, flex_attention) that the machine can't provide is an
    error in `job check` (exit 3), not a silently slower run; false: run without it."""
    checkpoint_every: int = 50
    """Optimizer steps between checkpoints (0: only the final save)."""
    checkpoint_every_s: int | None = None
    """Also checkpoint once this many seconds of training passed since the last save (0: never by time).
    None: 600 s when the run is managed (SOCRATES_MANAGED=1: a preemption loses at most ~10 min), else never."""
    keep_checkpoints: int = 2
    max_steps: int | None = None
    """Stop after this many optimizer steps (smoke runs, benchmarks); None: the schedule's own."""
    logging_steps: int = 1
    seed: int = 42
    report_to: str = "none"
    """Experiment tracking: none | tensorboard (event files in out/tensorboard/, brought back) | wandb
    (WANDB_API_KEY passed as a secret; WANDB_PROJECT etc. from the environment)."""

    def grad_accum(self, world_size: int = 1) -> int:
        """Accumulation steps that make `global_batch` from the micro-batch on `world_size` GPUs."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ContractError(
                f"train.global_batch: {self.global_batch} is not a multiple of micro_batch x "
                f"world size = {self.micro_batch} x {world_size}; pick a micro_batch that divides it"
            )
        return self.global_batch // per_step

    def total_steps(self, train_rows: int) -> int:
        """Optimizer steps the schedule takes over `train_rows` examples (capped by max_steps)."""
        steps = max(1, math.ceil(train_rows * self.epochs / self.global_batch))
        return min(steps, self.max_steps) if self.max_steps else steps


@dataclass(frozen=True)
class DataSpec:
    source: str = "socratesft/SocSci210"
    """Hugging Face dataset id, or a local parquet/jsonl file or folder in the same columns."""
    split: str = "unseen-studies"
    subset: float = 1.0
    """Fraction of *training* rows kept, stratified by study."""
    eval_subset: float | None = None
    """Fraction of test rows kept (None: the whole test side)."""
    participant_fraction: float = PARTICIPANT_FRACTION
    """split unseen-participants: the fraction of each study's participants in training (the rest are test)."""
    seed: int = 42


@dataclass(frozen=True)
class EvalSpec:
    enabled: bool = True
    base: bool = False  # also evaluate the base model (no adapter) into eval-base/: the paper's baseline
    mode: str = "sample"
    rows: int | None = None
    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 8
    batch_size: int = 16


JOB_RECOVERY_STRATEGIES = ("EAGER_NEXT_REGION", "FAILOVER")
BUCKET_SCHEMES = ("s3://", "r2://", "gs://", "file://")


@dataclass(frozen=True)
class StorageSpec:
    """Where a managed run (`up --spot` / `--managed`) keeps checkpoints and out/ (launcher/bucket.py)."""
    bucket: str | None = None
    """s3://NAME[/PREFIX], r2://NAME[/PREFIX], gs://NAME[/PREFIX]; None: one is made, named after the run."""
    keep_bucket: bool = False
    """Keep a bucket made for the run after its verified download (default: deleted)."""
    job_recovery: str = "EAGER_NEXT_REGION"
    """SkyPilot's recovery strategy after a preemption: EAGER_NEXT_REGION | FAILOVER."""
    max_restarts_on_errors: int = 0
    """Relaunches after the job itself fails (not a preemption); each is paid machine time."""


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    data: DataSpec = field(default_factory=DataSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    allow_cpu: bool = False
    """Let `check` and `train` run without a GPU (the smoke config; tests)."""
    image: str | None = None
    """A prebuilt job image (`socrates-launch image build --push REPO` prints one) to run the job in:
    SkyPilot's image_id and the SSH host's docker run; None: a venv from requirements/job.lock."""
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def with_overrides(self, overrides: Mapping[str, Any], source: str = "override") -> "RunConfig":
        """A copy with dotted keys replaced, e.g. {"data.subset": 0.1}; validated like a file."""
        raw = self.to_dict()
        for dotted, value in overrides.items():
            node: Any = raw
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.get(p) if isinstance(node, dict) else None
            if not isinstance(node, dict) or leaf not in node:
                raise ContractError(f"{source}: unknown key {_shown(dotted)}")
            node[leaf] = value
        return from_dict(raw, source=source)


_SECTIONS = {"model": ModelSpec, "lora": LoraSpec, "train": TrainSpec, "data": DataSpec, "eval": EvalSpec,
             "storage": StorageSpec}


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML config, or a JSON one (nested like the YAML, or flat in the seed's style)."""
    path = Path(path)
    if not path.is_file():
        raise ContractError(f"config {path}: no such file (give a .yaml or .json run config)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ContractError(f"config {path}: {path.stat().st_size:,} bytes, over the {MAX_CONFIG_BYTES:,} a run "
                            "config may have")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ContractError(f"config {path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset "
                            f"{e.start}); give a UTF-8 .yaml or .json run config") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else safe_yaml(text, f"config {path}")
    except ContractError:
        raise
    except (ValueError, yaml.YAMLError, RecursionError) as e:  # ValueError: json's, and an int past Python's limit
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ContractError(f"config {path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {first}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ContractError(f"config {path}: expected a mapping of sections, got {type(raw).__name__}")
    if path.suffix == ".json" and is_seed_style(raw):
        raw = from_seed(raw, source=str(path))
    return from_dict(raw, source=str(path))


MAX_CONFIG_BYTES = 1 << 20  # a run config is a few KiB
MAX_YAML_NODES = 100_000  # what a document may expand to through its aliases (a config has ~100 nodes)


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader; `safe_yaml` checks the composed document before constructing it."""


def safe_yaml(text: str, where: str = "YAML") -> Any:
    """yaml.safe_load, refusing a document whose aliases expand past MAX_YAML_NODES nodes (a 500-byte
    alias bomb expands to billions: building, walking or printing it would take minutes and gigabytes)
    or refer to themselves. Composing is linear in the text; only a bounded document is constructed."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node)
        if size is None:
            raise ContractError(f"{where}: an alias that refers to itself is not accepted")
        if size > MAX_YAML_NODES:
            raise ContractError(f"{where}: its aliases expand it past {MAX_YAML_NODES:,} values (an alias bomb?); "
                                "not accepted")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node) -> int | None:
    """How many nodes `root` is once every alias is copied out (counting stops past the limit), or None
    for a cycle. Iterative and memoized: an alias shares its node, so the graph stays small."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        children = [] if isinstance(node, yaml.ScalarNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else list(node.value)
        if done:
            open_.discard(id(node))
            sizes[id(node)] = min(MAX_YAML_NODES + 1, 1 + sum(sizes[id(c)] for c in children))
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_:
            return None
        open_.add(id(node))
        stack.append((node, True))
        for c in children:
            if id(c) in open_:
                return None
            if id(c) not in sizes:
                stack.append((c, False))
    return sizes[id(root)]


def from_dict(raw: Mapping[str, Any], source: str = "config") -> RunConfig:
    unknown = set(raw) - {f.name for f in fields(RunConfig)}
    if unknown:
        accepted = ", ".join(f.name for f in fields(RunConfig))
        raise ContractError(f"{source}: unknown key {_shown(sorted(unknown, key=repr)[0])} (accepted: {accepted})")
    kwargs: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        section = raw.get(name)
        if section is None:  # absent, or present with nothing under it (`train:`)
            section = {}
        if not isinstance(section, Mapping):
            raise ContractError(f"{source}: {name}: {_shown(section)} is not accepted (a mapping of {name} settings)")
        kwargs[name] = _build(cls, section, f"{source}: {name}")
    for name in ("name", "allow_cpu", "image", "schema"):
        if name in raw:
            kwargs[name] = _coerce(raw[name], get_type_hints(RunConfig)[name], f"{source}: {name}")
    cfg = RunConfig(**kwargs)
    validate(cfg, source)
    return cfg


def _whole(lo: int, hi: int | None = None, null: bool = False):
    """A whole number in [lo, hi] (or None when `null`)."""
    def ok(v: Any) -> bool:
        # bounded (|v| < 2**63): a 401-digit count would overflow the first float it meets
        return (v is None and null) or (is_int(v) and lo <= v and (hi is None or v <= hi))
    return ok


def _finite(lo: float, lo_open: bool = False, hi: float = math.inf, hi_open: bool = False):
    """A finite number in the given interval (NaN and +-inf never pass)."""
    def ok(v: Any) -> bool:
        return (isinstance(v, (int, float)) and math.isfinite(v) and (lo < v if lo_open else lo <= v)
                and (v < hi if hi_open else v <= hi))
    return ok


def _one_of(choices: tuple[str, ...]):
    return lambda v: v in choices


# Every checked field: (dotted key, predicate, what is accepted). Types are already checked by
# _coerce; these are the ranges and choices. Cross-field rules follow in validate().
_CHECKS: tuple[tuple[str, Any, str], ...] = (
    ("schema", lambda v: v == SCHEMA_VERSION, f"this version reads schema {SCHEMA_VERSION}"),
    ("model.init", _one_of(MODEL_INITS), " or ".join(MODEL_INITS)),
    ("model.id", bool, "a Hugging Face id or a local path"),
    ("train.method", _one_of(METHODS), " | ".join(METHODS)),
    ("train.lr_scheduler", _one_of(SCHEDULERS), " | ".join(SCHEDULERS)),
    ("train.precision", _one_of(PRECISIONS), " | ".join(PRECISIONS)),
    ("train.optim", _one_of(OPTIMIZERS), " | ".join(OPTIMIZERS)),
    ("train.attn_implementation", _one_of(ATTN_IMPLEMENTATIONS), " | ".join(ATTN_IMPLEMENTATIONS)),
    ("train.memory_mode", _one_of(MEMORY_MODES), " | ".join(MEMORY_MODES)),
    ("train.fp8_backward", _one_of(FP8_BACKWARDS), " | ".join(FP8_BACKWARDS)),
    ("train.global_batch", _whole(1), "a whole number >= 1"),
    ("train.micro_batch", _whole(1), "a whole number >= 1"),
    ("train.max_length", _whole(1), "a whole number >= 1"),
    ("train.lr", _finite(0, lo_open=True), "a finite number > 0"),
    ("train.epochs", _finite(0, lo_open=True), "a finite number > 0"),
    ("train.warmup_ratio", _finite(0, hi=1, hi_open=True), "0 <= x < 1"),
    ("train.weight_decay", _finite(0), "a finite number >= 0"),
    ("train.checkpoint_every", _whole(0), "steps >= 0 (0: only the final save)"),
    ("train.checkpoint_every_s", _whole(0, null=True), "seconds >= 0 (0: never by time), or null (600 when managed)"),
    ("train.keep_checkpoints", _whole(0), "a whole number >= 0 (0: keep every checkpoint)"),
    ("train.max_steps", _whole(1, null=True), "a whole number >= 1, or null"),
    ("train.checkpoint_layers", _whole(0, null=True), "a whole number >= 0, or null for all layers"),
    ("train.logging_steps", _whole(1), "a whole number >= 1"),
    ("train.report_to", _one_of(REPORT_TO), " | ".join(REPORT_TO)),
    ("train.seed", _whole(0, SEED_MAX), f"a whole number in 0..{SEED_MAX}"),
    ("lora.r", _whole(1), "a whole number >= 1"),
    ("lora.alpha", _finite(0, lo_open=True), "a finite number > 0"),
    ("lora.dropout", _finite(0, hi=1, hi_open=True), "0 <= dropout < 1"),
    ("lora.target_modules", lambda v: bool(v) and all(m.strip() for m in v),
     "at least one module name, none empty"),
    ("data.split", _one_of(SPLITS), " | ".join(SPLITS)),
    ("data.seed", _whole(0, SEED_MAX), f"a whole number in 0..{SEED_MAX}"),
    ("eval.mode", _one_of(EVAL_MODES), " | ".join(EVAL_MODES)),
    ("eval.rows", _whole(1, null=True), "a whole number >= 1, or null"),
    ("eval.temperature", _finite(0), "a finite number >= 0"),
    ("eval.top_p", _finite(0, lo_open=True, hi=1), "0 < top_p <= 1"),
    ("eval.max_new_tokens", _whole(1), "a whole number >= 1"),
    ("eval.batch_size", _whole(1), "a whole number >= 1"),
    ("storage.bucket", lambda v: v is None or (v.startswith(BUCKET_SCHEMES) and len(v) > len("s3://")),
     "s3://NAME[/PREFIX], r2://NAME[/PREFIX], gs://NAME[/PREFIX], or null (one made for the run)"),
    ("storage.job_recovery", _one_of(JOB_RECOVERY_STRATEGIES), " | ".join(JOB_RECOVERY_STRATEGIES)),
    ("storage.max_restarts_on_errors", _whole(0), "a whole number >= 0"),
    ("image", lambda v: v is None or bool(IMAGE_REF.fullmatch(v)),
     "a docker image reference like ghcr.io/you/socrates-job:lock-0123456789ab, or null"),
)


# A docker image reference: [registry[:port]/]path[:tag][@sha256:digest] (the distribution grammar, simplified).
IMAGE_REF = re.compile(r"(?:(?:localhost|[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)+)(?::[0-9]+)?/|[a-zA-Z0-9-]+:[0-9]+/)?"
                       r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
                       r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")


def validate(cfg: RunConfig, source: str = "config") -> None:
    for key, ok, accepted in _CHECKS:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if not ok(value):
            shown = list(value) if isinstance(value, tuple) else value
            raise ContractError(f"{source}: {key}: {_shown(shown)} is not accepted ({accepted})")
    cfg.train.grad_accum(1)
    if cfg.train.method == "full" and "adamw" not in cfg.train.optim:
        raise ContractError(f"{source}: train.optim: {_shown(cfg.train.optim)} is not accepted with train.method full (an AdamW: "
                            "adamw_torch, adamw_torch_fused, or an 8-bit/paged AdamW name, which the full fine-tune "
                            "runs as torch AdamW with fp32 states sharded over the GPUs)")
    check_fraction(cfg.data.subset, f"{source}: data.subset")
    if cfg.data.eval_subset is not None:
        check_fraction(cfg.data.eval_subset, f"{source}: data.eval_subset")
    check_participant_fraction(cfg.data.participant_fraction, f"{source}: data.participant_fraction")


def check_participant_fraction(value: Any, where: str) -> float:
    """A fraction in (0, 1): some of each study's participants train, the others are test."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < 1):
        raise ContractError(f"{where}: {value!r} is not accepted (a fraction in (0, 1), e.g. 0.1: that share of "
                            "each study's participants trains, the rest are test)")
    return float(value)


def check_fraction(value: Any, where: str) -> float:
    """A fraction in (0, 1]: the subset of rows to keep."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1):
        raise ContractError(f"{where}: {_shown(value)} is not accepted (a fraction in (0, 1], e.g. 0.1)")
    return float(value)


# --- The seed's flat JSON (`config_paper.json`) ---------------------------------------------

_SEED_KEYS: dict[str, str | None] = {
    "model_name": "model.id",
    "model_name_or_path": "model.id",
    "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs",
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.micro_batch",
    "global_batch_size": "train.global_batch",
    "lr_scheduler_type": "train.lr_scheduler",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "optim": "train.optim",
    "optimizer": "train.optim",
    "max_seq_length": "train.max_length",
    "max_length": "train.max_length",
    "seed": "train.seed",
    "save_steps": "train.checkpoint_every",
    "logging_steps": "train.logging_steps",
    "max_steps": "train.max_steps",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "target_modules": "lora.target_modules",
    "data_dir": "data.source",
    "dataset_name": "data.source",
    "subset": "data.subset",
    "system_prompt": "model.system_prompt",
    "run_name": "name",
    # Derived or local-only in the seed; checked (_SEED_CHECKS), not stored as they are:
    **dict.fromkeys(("gradient_accumulation_steps", "bf16", "fp16", "output_dir", "use_4bit", "load_in_4bit",
                     "bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "use_nested_quant",
                     "bnb_4bit_use_double_quant", "report_to")),
}


_SEED_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# The seed's keys that are not stored as they are: (predicate, what is accepted). They are checked
# here, then turned into the schema's own fields (precision, method, global/micro batch) below.
_SEED_CHECKS: dict[str, tuple[Any, str]] = {
    **dict.fromkeys(("per_device_train_batch_size", "global_batch_size", "gradient_accumulation_steps"),
                    (_whole(1), "a whole number >= 1")),
    **dict.fromkeys(("bf16", "fp16", "use_4bit", "load_in_4bit"), (lambda v: isinstance(v, bool), "true or false")),
    "bnb_4bit_quant_type": (lambda v: v == "nf4", "'nf4', the only 4-bit type the job builds"),
    "bnb_4bit_compute_dtype": (lambda v: v in _SEED_DTYPES, " | ".join(_SEED_DTYPES) + ", agreeing with bf16/fp16"),
    **dict.fromkeys(("use_nested_quant", "bnb_4bit_use_double_quant"),
                    (lambda v: v is True, "true; the job always uses double quantization")),
    "output_dir": (lambda v: isinstance(v, str), "a path; local to the seed, not used"),
    "report_to": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                  "a name or a list of names; local to the seed, not used"),
}


def is_seed_style(raw: Mapping[str, Any]) -> bool:
    return not (set(raw) & (set(_SECTIONS) | {"schema"})) and bool(set(raw) & set(_SEED_KEYS))


def from_seed(raw: Mapping[str, Any], source: str = "config") -> dict:
    """Map the seed's flat keys onto the nested schema; derived keys must agree with it.

    bf16/fp16 set train.precision (bf16 false and no fp16: fp32; both true is refused);
    use_4bit/load_in_4bit false: method lora. gradient_accumulation_steps (ga) is derived from the
    global batch, so it fills in whichever of per_device_train_batch_size (micro) and
    global_batch_size is missing (micro absent: global / ga; both absent: ga x the default micro),
    and must agree when both are given: ga x micro == global.
    """
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _SEED_KEYS:
            accepted = ", ".join(sorted(_SEED_KEYS))
            raise ContractError(f"{source}: unknown seed-style key {_shown(key)} (accepted: {accepted})")
        if key in _SEED_CHECKS and not _SEED_CHECKS[key][0](value):
            raise ContractError(f"{source}: {key}: {_shown(value)} is not accepted ({_SEED_CHECKS[key][1]})")
        target = _SEED_KEYS[key]
        if target is None:
            continue
        node = out
        *parents, leaf = target.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    train = out.setdefault("train", {})

    bf16, fp16 = raw.get("bf16"), raw.get("fp16")
    if bf16 and fp16:
        raise ContractError(f"{source}: bf16: True and fp16: True is not accepted (one precision: set one of them)")
    precision = "fp16" if fp16 else "fp32" if bf16 is False else "bf16"
    if "bf16" in raw or "fp16" in raw:
        train["precision"] = precision
    dtype = raw.get("bnb_4bit_compute_dtype")
    if dtype is not None and _SEED_DTYPES[dtype] != precision:
        raise ContractError(f"{source}: bnb_4bit_compute_dtype: {_shown(dtype)} is not accepted (the job computes "
                            f"in the training precision, {precision}; set bf16/fp16 to match or drop it)")

    four_bit = {raw[k] for k in ("use_4bit", "load_in_4bit") if k in raw}
    if len(four_bit) > 1:
        raise ContractError(f"{source}: use_4bit: {_shown(raw['use_4bit'])} is not accepted "
                            f"(it disagrees with load_in_4bit: {_shown(raw['load_in_4bit'])})")
    if four_bit == {False}:
        train["method"] = "lora"

    ga = raw.get("gradient_accumulation_steps")
    if ga is not None:
        micro, glob = train.get("micro_batch"), train.get("global_batch")
        if micro is None and glob is None:
            train["global_batch"] = ga * TrainSpec.micro_batch
        elif glob is None:
            train["global_batch"] = ga * micro
        elif micro is None:
            if glob % ga:
                raise ContractError(f"{source}: gradient_accumulation_steps: {ga} is not accepted (it must divide "
                                    f"global_batch_size {glob}; the accumulation is derived from the global batch)")
            train["micro_batch"] = glob // ga
        elif ga * micro != glob:
            raise ContractError(
                f"{source}: gradient_accumulation_steps {ga} x per_device_train_batch_size "
                f"{micro} != global_batch_size {glob} "
                "(the accumulation is derived from the global batch; drop one of them)"
            )
    if not train:
        del out["train"]
    return out


# --- helpers ---------------------------------------------------------------------------------

def _build(cls: type, section: Mapping[str, Any], where: str):
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in section.items():
        if key not in hints:
            raise ContractError(f"{where}: unknown key {_shown(key)} (accepted: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a field's type; ints widen to floats, lists become tuples."""
    text = str(hint)
    optional = "None" in text
    if value is None:
        if optional:
            return None
        raise ContractError(f"{where}: must not be empty")
    if "tuple" in text:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ContractError(f"{where}: {_shown(value)} is not accepted (a list of names)")
        return tuple(value)
    if "dict" in text:
        if not isinstance(value, Mapping):
            raise ContractError(f"{where}: {_shown(value)} is not accepted (a mapping)")
        return dict(value)
    if "float" in text:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 1e-5 as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ContractError(f"{where}: {_shown(value)} is not accepted (a number)")
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise ContractError(f"{where}: {_shown(value)} is not accepted (a finite number)") from None
    for name, ok, what in _PLAIN_TYPES:
        if name in text and not ok(value):
            raise ContractError(f"{where}: {_shown(value)} is not accepted ({what})")
    return value


# The field types with nothing to convert (no type hint names two of them): (name in the hint, check, accepted).
_PLAIN_TYPES = (("bool", lambda v: isinstance(v, bool), "true or false"),
                ("int", lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
                ("str", lambda v: isinstance(v, str), "text"))


def _shown(value: Any) -> str:
    """A value for an error message, kept short (reprlib: a huge value is never repr'd whole)."""
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlong, r.maxlevel = 60, 60, 40, 3
    return r.repr(value)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
