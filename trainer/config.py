"""Every training option in one dataclass, read from a YAML file and overridden on the command line.

    python -m trainer --config run.yaml --max-steps 50 --loss-type grpo --beta 0.04

The loss options carry the names and defaults of `grpo_kernels.GRPOLossConfig` (TRL 1.16's), so `loss_config()` is a
field-by-field copy. The other defaults suit the built-in task and its tiny model; a real model wants e.g.
`--learning-rate 1e-6 --max-completion-length 1024 --dtype bfloat16`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from grpo_kernels import GRPOLossConfig
from grpo_kernels.fused_linear import STRATEGIES

LR_SCHEDULERS = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "adafactor", "sgd")
DTYPES = ("auto", "float32", "bfloat16")
SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


class SetupError(ValueError):
    """An option that names something missing or unusable (a model, a dataset, a checkpoint, a reward function):
    `python -m trainer` reports it in one line, as it does a bad option."""


def first_line(err: BaseException, default: str) -> str:
    """The first line of `err`'s message (a library's may run to many), or `default` where it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else default


def _help(text: str, group: str | None = None) -> dict[str, str]:
    """Field metadata: the `--help` text, and the heading of the options that start here."""
    return {"help": text} if group is None else {"help": text, "group": group}


@dataclass
class TrainerConfig:
    """Options of a GRPO run; `python -m trainer --help` lists them with their help."""

    # what to train on
    model: str | None = field(
        default=None,
        metadata=_help(
            "Hugging Face model name or local path. Default: a tiny Llama built from a config on a byte-level "
            "tokenizer, no download",
            group="model and data",
        ),
    )
    dataset: str | None = field(
        default=None,
        metadata=_help(
            "Hugging Face dataset name, or a local .json/.jsonl/.csv/.parquet file, with a prompt and an answer "
            "column. Default: the built-in single-digit addition task"
        ),
    )
    dataset_config: str | None = field(default=None, metadata=_help("the dataset's configuration (e.g. main)"))
    dataset_split: str = field(default="train", metadata=_help("the dataset split to train on"))
    prompt_column: str = field(default="question", metadata=_help("dataset column holding the prompt"))
    answer_column: str = field(
        default="answer",
        metadata=_help("dataset column holding the reference answer (the text after '####' when there is one)"),
    )
    chat_template: bool = field(
        default=True, metadata=_help("wrap prompts in the tokenizer's chat template when it has one")
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["answer", "format"],
        metadata=_help(
            "reward functions: answer (exact match), format (digits, then stop: the built-in task's shaping), math "
            "(math-verify when installed), stop (ended with EOS), or module:function for your own"
        ),
    )
    reward_weights: list[float] = field(
        default_factory=lambda: [1.0, 0.25], metadata=_help("one weight per reward function")
    )
    scale_rewards: str = field(
        default="group", metadata=_help("advantage scaling: group (std of the group), batch, or none (Dr. GRPO)")
    )
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata=_help("sum_then_normalize (weighted sum of the rewards, then normalise) or normalize_then_sum"),
    )

    pretrain_steps: int = field(
        default=400,
        metadata=_help(
            "steps of next-token pretraining of the tiny model on sums whose written answer is right 40%% of the time, "
            "before GRPO: a weak policy for GRPO to improve (0: random weights; not used with --model)"
        ),
    )

    # generation
    num_prompts: int = field(
        default=16, metadata=_help("prompts per generation batch, over all processes", group="generation")
    )
    num_generations: int = field(default=8, metadata=_help("completions sampled per prompt (the group size G)"))
    max_prompt_length: int = field(default=512, metadata=_help("prompts are cut to their last this many tokens"))
    max_completion_length: int = field(
        default=8, metadata=_help("most tokens sampled per completion (also dr_grpo's normaliser)")
    )
    temperature: float = field(
        default=1.0, metadata=_help("sampling temperature; the loss divides the logits by the same value")
    )
    top_p: float = field(
        default=1.0, metadata=_help("nucleus sampling: sample from the smallest set of tokens holding this probability")
    )
    top_k: int = field(default=0, metadata=_help("sample from the k most likely tokens only (0: all)"))

    # the loss: GRPOLossConfig's fields, with its names and defaults
    loss_type: str = field(
        default="dapo",
        metadata=_help("grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo or vespo", group="loss (TRL's GRPO options)"),
    )
    beta: float = field(
        default=0.04,
        metadata=_help(
            "weight of the k3 KL penalty to the reference model (TRL's default is 0; 0.04 here so the built-in run "
            "shows its KL); 0 loads no reference model"
        ),
    )
    epsilon: float = field(default=0.2, metadata=_help("lower clipping range of the ratio: r >= 1 - epsilon"))
    epsilon_high: float | None = field(
        default=None, metadata=_help("upper clipping range, r <= 1 + epsilon_high (none: epsilon; DAPO uses 0.28)")
    )
    delta: float | None = field(
        default=None, metadata=_help("cap on the unclipped ratio (two-sided clipping); none: off")
    )
    importance_sampling_level: str = field(
        default="token", metadata=_help("token ratios, or sequence (GSPO: one ratio per completion)")
    )
    use_bias_correction_kl: bool = field(default=True, metadata=_help("multiply the KL term by the importance ratio"))
    sapo_temperature_pos: float = field(default=1.0, metadata=_help("SAPO gate temperature for A > 0"))
    sapo_temperature_neg: float = field(default=1.05, metadata=_help("SAPO gate temperature for A <= 0"))
    vespo_k_pos: float = field(default=2.0, metadata=_help("VESPO gamma-weight shape k for A >= 0"))
    vespo_lambda_pos: float = field(default=3.0, metadata=_help("VESPO gamma-weight rate lambda for A >= 0"))
    vespo_k_neg: float = field(default=3.0, metadata=_help("VESPO gamma-weight shape k for A < 0"))
    vespo_lambda_neg: float = field(default=2.0, metadata=_help("VESPO gamma-weight rate lambda for A < 0"))
    top_entropy_quantile: float = field(
        default=1.0, metadata=_help("train only on this top fraction of tokens by entropy (1: all)")
    )
    off_policy_mask_threshold: float | None = field(
        default=None,
        metadata=_help("drop negative-advantage completions whose mean KL to the sampler exceeds this; none: off"),
    )
    entropy_coef: float = field(default=0.0, metadata=_help("weight of the entropy bonus"))
    grad_filter_eps: float | None = field(
        default=None,
        metadata=_help(
            "gradient filtering of the LM head's backward (approximate, faster on peaked softmaxes; e.g. 0.000244 = "
            "2**-12 for bf16); none: exact"
        ),
    )
    loss_strategy: str | None = field(
        default=None,
        metadata=_help(
            "the fused loss's schedule: chunked (the fastest), tiles (small memory beyond the gradients for a fourth "
            "matrix product: 56 MiB against 512 at 1.3x the time on an H100), scratch (three products, the first "
            "chunk's logits in d_weight's memory: 60 MiB at 1.24x chunked's time on an H200), vocab-blocks, fused "
            "(Triton kernels, CUDA); none: GRPO_KERNELS_LINEAR, else chunked"
        ),
    )
    loss_chunk_mib: float | None = field(
        default=None,
        metadata=_help(
            "the fused loss's chunk budget in MiB of fp32 logits; none: GRPO_KERNELS_CHUNK_MIB, else the "
            "strategy's (chunked 1024, vocab-blocks 128, tiles 64, scratch 120 on CUDA)"
        ),
    )

    # optimisation
    optimizer: str = field(
        default="adamw",
        metadata=_help(
            "adamw (two moments per trainable parameter), adafactor (PyTorch's: a factored second moment, about "
            "rows + columns values per weight matrix; its step is the learning rate times each parameter's RMS) or "
            "sgd (plain SGD, no state): on little memory the optimizer state is often the largest item "
            "(--dry-run-memory)",
            group="optimisation",
        ),
    )
    learning_rate: float = field(
        default=3e-4,
        metadata=_help("learning rate (the default suits the tiny model with AdamW; LLMs want about 1e-6 with it)"),
    )
    weight_decay: float = field(default=0.0, metadata=_help("weight decay, as the optimizer applies it"))
    max_grad_norm: float = field(default=1.0, metadata=_help("clip the gradient norm to this (0: no clipping)"))
    lr_scheduler: str = field(
        default="constant", metadata=_help("learning-rate schedule after the warm-up: constant, linear or cosine")
    )
    warmup_steps: int = field(default=0, metadata=_help("steps of linear learning-rate warm-up"))
    max_steps: int = field(default=500, metadata=_help("optimizer steps to train for"))
    num_iterations: int = field(
        default=1, metadata=_help("optimisation passes over each generation batch (mu in the GRPO paper)")
    )
    steps_per_generation: int = field(
        default=1,
        metadata=_help("optimizer steps that share one generation batch, each on an equal share of its completions"),
    )
    max_tokens_per_microbatch: int = field(
        default=4096,
        metadata=_help(
            "token budget of a micro-batch (prompt + completion tokens, padding included unless packed): a step "
            "accumulates gradients over as many micro-batches as its completions need; a longer sequence gets one alone"
        ),
    )
    packing: bool = field(
        default=False,
        metadata=_help(
            "concatenate a micro-batch's sequences without padding, with per-sequence position ids: flash-attn's "
            "varlen path when installed, else flex_attention on CUDA, else SDPA with a document mask"
        ),
    )
    gradient_checkpointing: bool = field(
        default=True, metadata=_help("recompute each layer's activations in the backward pass")
    )
    dtype: str = field(
        default="auto",
        metadata=_help(
            "dtype of the weights and the optimizer's state: auto (bfloat16 on a GPU that has it, else float32), "
            "float32 or bfloat16"
        ),
    )
    lora_r: int = field(
        default=0,
        metadata=_help(
            "LoRA rank (needs peft); 0 trains every weight. Under LoRA the reference model is the base weights with "
            "the adapters disabled: no extra memory"
        ),
    )
    lora_alpha: float = field(default=32.0, metadata=_help("LoRA scaling alpha"))
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata=_help("modules LoRA adapts, by peft's names (e.g. q_proj v_proj)"),
    )
    fsdp: bool = field(
        default=False,
        metadata=_help(
            "shard the policy and the reference model over the processes with PyTorch's FSDP2 (fully_shard per "
            "decoder layer, then the whole model) instead of copying them to each with DDP: weights, gradients and "
            "optimizer state take about 1/N of the memory each. Needs several processes (accelerate launch "
            "--num_processes N); checkpoints hold the full weights"
        ),
    )

    # output
    output_dir: str = field(
        default="outputs/grpo",
        metadata=_help("metrics.jsonl, curves.png, checkpoints and TensorBoard logs go here", group="output"),
    )
    save_steps: int = field(default=0, metadata=_help("save a checkpoint every this many steps (0: at the end only)"))
    overwrite_output_dir: bool = field(
        default=False,
        metadata=_help(
            "a new run (no --resume) deletes the checkpoint-*/ an earlier run left in output_dir; "
            "without it, such checkpoints are an error"
        ),
    )
    resume: str | None = field(
        default=None,
        metadata=_help("resume from a checkpoint directory, or from the latest one in output_dir with 'latest'"),
    )
    tensorboard: bool = field(default=True, metadata=_help("also log to TensorBoard when it is installed"))
    seed: int = field(default=0, metadata=_help("seed of the model's initialisation, the prompts and the sampling"))
    dry_run_memory: bool = field(
        default=False, metadata=_help("print the estimated peak memory of this configuration, then exit")
    )

    def __post_init__(self) -> None:
        for name in ("num_prompts", "num_generations", "max_prompt_length", "max_completion_length", "max_steps",
                     "num_iterations", "steps_per_generation", "max_tokens_per_microbatch"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        for name in ("warmup_steps", "save_steps", "top_k", "lora_r", "pretrain_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0; got {value!r}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (advantages compare completions of a prompt); got "
                             f"{self.num_generations}")  # fmt: skip
        if not self.reward_funcs:
            raise ValueError("reward_funcs is empty: name at least one reward function")
        from trainer.data import REWARD_FUNCTIONS

        for name in self.reward_funcs:
            if name not in REWARD_FUNCTIONS and ":" not in name:
                raise ValueError(f"unknown reward function {name!r} in reward_funcs: use one of "
                                 f"{', '.join(REWARD_FUNCTIONS)} or module:function")  # fmt: skip
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values but reward_funcs has {len(self.reward_funcs)} "
                f"({' '.join(self.reward_funcs)}): give one weight per reward function"
            )
        if (self.num_prompts * self.num_generations) % self.steps_per_generation:
            raise ValueError(
                f"the generation batch ({self.num_prompts} prompts x {self.num_generations} = "
                f"{self.num_prompts * self.num_generations} completions) does not split evenly into "
                f"steps_per_generation = {self.steps_per_generation} steps"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1]; got {self.top_p}")
        if self.grad_filter_eps is not None and not 0.0 <= self.grad_filter_eps < 1.0:
            raise ValueError(f"grad_filter_eps must lie in [0, 1) or be none; got {self.grad_filter_eps}")
        if self.loss_strategy is not None and self.loss_strategy not in STRATEGIES:
            raise ValueError(f"loss_strategy must be one of {', '.join(STRATEGIES)}; got {self.loss_strategy!r}")
        if self.loss_chunk_mib is not None and not 0 < self.loss_chunk_mib < math.inf:
            raise ValueError(
                f"loss_chunk_mib must be a positive, finite number of MiB or none; got {self.loss_chunk_mib}"
            )
        if self.loss_strategy in ("tiles", "scratch") and self.grad_filter_eps is not None:
            raise ValueError(
                f"loss_strategy {self.loss_strategy} does not filter gradients: leave grad_filter_eps unset"
            )
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("learning_rate must be > 0, weight_decay and max_grad_norm >= 0; got "
                             f"{self.learning_rate}, {self.weight_decay}, {self.max_grad_norm}")  # fmt: skip
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}; got {self.lr_scheduler!r}")
        if self.dtype == "float16":
            raise ValueError(
                "dtype float16 is not supported: the weights and AdamW's state would be fp16, where AdamW's epsilon "
                "(1e-8) and most updates round to 0 and the first steps turn the weights to NaN. Use bfloat16, or "
                "float32 on a GPU without bf16"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}; got {self.scale_rewards!r}")
        if self.multi_objective_aggregation not in AGGREGATIONS:
            raise ValueError(f"multi_objective_aggregation must be one of {', '.join(AGGREGATIONS)}; got "
                             f"{self.multi_objective_aggregation!r}")  # fmt: skip
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32); got {self.seed!r}")
        self.loss_config()  # checks the loss options

    def loss_config(self) -> GRPOLossConfig:
        """The loss options as a `GRPOLossConfig`."""
        return GRPOLossConfig(**{f.name: getattr(self, f.name) for f in fields(GRPOLossConfig)})

    @property
    def needs_old_logps(self) -> bool:
        """Whether the policy changes between sampling a batch and its last use, so the sampling policy's log-probs
        must be kept (otherwise the current log-probs, detached, are the old ones)."""
        return self.num_iterations > 1 or self.steps_per_generation > 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _scalar(kind: type, optional: bool):
    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def _unwrap(hint) -> tuple[typing.Any, bool]:
    """`X | None` -> (X, True); anything else -> (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def build_parser() -> argparse.ArgumentParser:
    """The command line: one option per field of `TrainerConfig`, plus `--config FILE.yaml`."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="GRPO training on the fused GRPO loss kernels. With no arguments: trains a tiny model on a "
        "synthetic arithmetic task on the CPU, writing metrics.jsonl and curves.png to --output-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file of options (field names as keys); the command "
                        "line overrides it")  # fmt: skip
    hints = typing.get_type_hints(TrainerConfig)
    group = parser
    for f in fields(TrainerConfig):
        if "group" in f.metadata:
            group = parser.add_argument_group(f.metadata["group"])
        kind, optional = _unwrap(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kwargs: dict[str, typing.Any] = {"dest": f.name, "default": default, "help": f.metadata["help"]}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            kwargs.update(nargs="+", type=item, metavar=item.__name__.upper())
        else:
            kwargs.update(type=_scalar(kind, optional), metavar=kind.__name__.upper())
        group.add_argument(flag, **kwargs)
    return parser


def load_yaml(path: str | Path) -> dict[str, typing.Any]:
    """Options from a YAML file; keys are `TrainerConfig` field names (dashes allowed)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ValueError(f"--config {path}: cannot read it ({err.strerror or err})") from err
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    hints = typing.get_type_hints(TrainerConfig)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ValueError(f"{path}: unknown options {', '.join(unknown)} (see python -m trainer --help)")
    out = {}
    for name, value in data.items():  # as the command line would parse it: YAML reads 1e-6 as a string
        kind, optional = _unwrap(hints[name])
        try:
            if value is None or kind is bool:
                out[name] = value
            elif typing.get_origin(kind) is list:
                (item,) = typing.get_args(kind)
                out[name] = [item(v) for v in (value if isinstance(value, list) else [value])]
            else:
                out[name] = _scalar(kind, optional)(str(value))
        except ValueError as err:
            raise ValueError(f"{path}: {name} cannot be {value!r} ({err})") from err
    return out


def checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints in `output_dir`, by step."""
    found = (p.parent for p in output_dir.glob("checkpoint-*/trainer_state.pt"))
    return sorted((p for p in found if p.name.split("-", 1)[1].isdigit()), key=lambda p: int(p.name.split("-", 1)[1]))


def find_checkpoint(resume: str, output_dir: Path) -> Path:
    """The checkpoint directory `resume` names: a path, or `latest` (the highest step in `output_dir`)."""
    if resume != "latest":
        path = Path(resume)
        if not (path / "trainer_state.pt").is_file():
            raise SetupError(f"--resume {resume}: {path} is not a checkpoint (no trainer_state.pt)")
        return path
    found = checkpoints(output_dir)
    if not found:
        raise SetupError(f"--resume latest: no checkpoint-*/ in {output_dir}")
    return found[-1]


CONFIG_FILE = "trainer_config.json"  # a checkpoint's options, which a resumed run is checked against


def saved_options(path: Path) -> dict:
    """The options (`TrainerConfig.to_dict()`) of the run that saved checkpoint `path`."""
    if (path / CONFIG_FILE).is_file():
        return json.loads((path / CONFIG_FILE).read_text())
    import torch  # a checkpoint saved before the options had a file of their own

    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)["config"]


# What a resumed run does not take from its checkpoint's options: where it finds the checkpoint and writes
RESUME_OWN = frozenset({"resume", "output_dir", "overwrite_output_dir", "dry_run_memory"})


def parse_config(argv: list[str] | None = None) -> TrainerConfig:
    """`TrainerConfig` from the command line, over the YAML file it names, over (with `--resume`) the options of the
    run that saved the checkpoint: `--resume latest` alone continues that run as it was set up."""
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    from_yaml = {}
    if args.config:
        try:
            from_yaml = load_yaml(args.config)
        except ValueError as err:
            parser.error(str(err))
        parser.set_defaults(**from_yaml)
        args, _ = parser.parse_known_args(argv)
    if args.resume:
        try:
            saved = saved_options(find_checkpoint(args.resume, Path(args.output_dir)))
        except SetupError:  # no such checkpoint: the trainer says so, naming the option
            saved = {}
        names = {f.name for f in fields(TrainerConfig)} - RESUME_OWN
        parser.set_defaults(**{k: v for k, v in saved.items() if k in names})
        parser.set_defaults(**from_yaml)
    values = vars(parser.parse_args(argv))
    values.pop("config")
    try:
        return TrainerConfig(**values)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
