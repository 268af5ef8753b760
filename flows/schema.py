"""Structured-config schemas: a misspelt key, a wrong type or an unknown group option fails
at composition time with Hydra's message, before anything runs.

Components (methods, losses, judges, data sources) are dataclasses; their schema is derived
from the dataclass itself plus a ``_target_`` field, so a component's parameters are declared
once, in its own module.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from evaluation.judges import AnchorJudge, CorrectnessJudge, RatingJudge, YesNoJudge
from evaluation.rating_rewards import GRPORewardJudge
from evaluation.suites.hf import HFSource
from methods.judge_grpo import JudgeGRPO
from methods.mpo import MPO
from methods.reasoner import Reasoner
from methods.sft_control import ContinuedSFT
from methods.seva import SeVa
from methods.uvcot import UVCoT
from models.distributed_train import LAUNCHERS, accelerate_config_path
from models.trainer import OPTIMIZERS
from models.losses import (
    BCOLoss,
    BCOPairLoss,
    CDPOLoss,
    DPOLoss,
    HingeLoss,
    IPOLoss,
    MPOLoss,
    MultiNegativeDPOLoss,
    RobustDPOLoss,
    SDPOLoss,
    SFTLoss,
)
from models.tiny import TinySpec


def schema_of(cls: type) -> type:
    """A dataclass with ``_target_`` = cls's import path and cls's fields and defaults."""
    target = f"{cls.__module__}.{cls.__qualname__}"
    hints = typing.get_type_hints(cls)
    spec = [("_target_", str, field(default=target))]
    for f in dataclasses.fields(cls):
        default = (field(default=f.default) if f.default is not dataclasses.MISSING
                   else field(default_factory=f.default_factory))
        spec.append((f.name, hints[f.name], default))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", spec)


@dataclass
class LoraSchema:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Regex over module names: the language model's linear layers, not the vision tower or
    # projector (as SeVa and LLaVA's own LoRA recipes do).
    target_modules: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class ModelSchema:
    name_or_path: str = MISSING
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cache_dir: str = "runs/_models"  # where the embedded tiny model is built and cached
    gen_batch_size: int = 32
    lora: LoraSchema = field(default_factory=LoraSchema)
    tiny: Optional[TinySpec] = None  # set only for the embedded default: build, then load


@dataclass
class DataSchema:
    source: Any = MISSING  # a query source with .queries(split, start, stop, seed)
    split: str = "train"


@dataclass
class EvalSchema:
    source: Any = MISSING
    split: str = "test"
    size: int = 1000
    batch_size: int = 64
    max_new_tokens: int = 8
    # Re-rank N sampled answers by the DPO implicit reward (evaluation/rerank.py); 0 = off.
    rerank_samples: int = 0
    # true: re-rank only in the final round (the report's best-of-N / vote columns read that
    # round); saves N samples per item in every earlier evaluation
    rerank_final_only: bool = False
    rerank_temperature: float = 1.0
    rerank_beta: float = 0.1
    # Box-CoT evaluation (methods with eval_box_cot, i.e. uvcot) runs on the first N items.
    box_cot_size: int = 300
    # Sampled accuracy: one answer per item at this temperature (0 = off), seeded by seed and
    # round so every round's sample uses the same random stream.
    sampled_temperature: float = 1.0


@dataclass
class TrainSchema:
    lr: float = 3e-4
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int = 0  # 0: epochs decide
    batch_size: int = 16
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 2048  # longer pairs are dropped and counted, never truncated
    ref_batch_size: int = 32
    save_every: int = 0  # > 0: save the full training state every N steps so a killed stage resumes
    # inprocess: train in the stage's own process. accelerate: `accelerate launch` num_processes
    # ranks of models/distributed_train.py with conf/accelerate/<accelerate_config>.yaml (or a path).
    launcher: str = "inprocess"
    num_processes: int = 2
    accelerate_config: str = "ddp_cpu"
    # Exact optimizer steps of round i (entry i-1), overriding epochs/max_steps; 0 = no training
    # that round. flows/ablate.py sets it on the continued-SFT control to match a method's steps.
    steps_per_round: list[int] = field(default_factory=list)
    # Keep as many A-over-B pairs as B-over-A pairs for every answer pair (methods/balance.py):
    # a round then cannot shift the answer prior, only which answer each image supports.
    balance_pairs: bool = False
    # adamw | sgd (momentum 0.9). AdamW's first steps move every weight by about lr whatever its
    # gradient's size (m / sqrt(v) is the gradient's sign at step 1); an SGD step is proportional
    # to the gradient. Measured for SeVa (README, seva_refusal_tuning): SGD puts its steps on the
    # answer logits and shifts a type's answer prior harder, so adamw stays the default.
    optimizer: str = "adamw"


@dataclass
class FaultSchema:
    """Fault injection, off by default: raise in ``stage`` of ``round`` on its first attempt
    only, to prove that retries and resumption work."""

    stage: Optional[str] = None  # generate | score | pair | train | evaluate
    round: int = 1


@dataclass
class DaskSchema:
    """Where ``generate.task_runner=dask`` runs the shards."""

    address: Optional[str] = None  # a running scheduler (tcp://host:8786); None: a LocalCluster here
    n_workers: int = 2  # LocalCluster worker processes, one shard at a time each
    # torch threads per LocalCluster worker; 0: $OMP_NUM_THREADS if set, else cores // n_workers
    torch_threads: int = 0


@dataclass
class VLLMSchema:
    """vLLM engine settings for ``generate.backend=vllm`` (models/vllm_sampling.py)."""

    gpu_memory_utilization: float = 0.9
    max_model_len: Optional[int] = None  # None: the model's own context length
    max_images_per_prompt: int = 2  # uvcot's answer step shows the image and its crop


@dataclass
class GenerateSchema:
    """How the generate stage runs (tasks/generate.py)."""

    shards: int = 1  # > 1: contiguous query shards, one Prefect task and artifact each
    task_runner: str = "thread"  # thread | dask: where the shard tasks run
    backend: str = "hf"  # hf | vllm: what samples the answers
    dask: DaskSchema = field(default_factory=DaskSchema)
    vllm: VLLMSchema = field(default_factory=VLLMSchema)


TASK_RUNNERS = ("thread", "dask")
BACKENDS = ("hf", "vllm")
# The generate keys that change results, at the values that reproduce runs made before the
# group existed: at these values the group is left out of the run key, so those runs'
# directories keep resuming. Its other keys only choose where and how fast answers are sampled.
GENERATE_RESULT_DEFAULTS = {"shards": 1, "backend": "hf"}


@dataclass
class AblationSchema:
    """An experiment of several variants x seeds (flows/ablate.py); empty variants = one plain run."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    control: bool = True  # add continued SFT (method=sft_control) matched to variants' train settings and steps
    control_for: Optional[list[str]] = None  # the variants that get a matched control (None: every variant)
    variants: dict[str, list[str]] = field(default_factory=dict)  # label -> Hydra overrides
    # runs at once, each its own process with cores // workers torch threads (flows/ablate.py);
    # 1: in this process, one after another
    workers: int = 1


@dataclass
class TinyFormatsSchema:
    """Shares of the embedded base's SFT queries taught in a method's prompt formats
    (models/tiny_formats.py), read by conf/model/tiny.yaml. A method whose prompts a base must
    have learnt selects them (conf/method/uvcot.yaml: conf/tiny_formats/uvcot.yaml), as a hub
    VLM's SFT mix teaches boxes; a hub model ignores them."""

    box_share: float = 0.0
    cot_share: float = 0.0
    # questions about absent objects answered "unanswerable" (VizWiz's convention in LLaVA-1.5's
    # SFT mix; method=seva selects it: conf/tiny_formats/seva.yaml)
    unanswerable_share: float = 0.0


@dataclass
class Config:
    method: Any = MISSING
    model: ModelSchema = MISSING
    loss: Any = MISSING
    data: DataSchema = MISSING
    eval: EvalSchema = MISSING
    judge: Any = MISSING
    train: TrainSchema = MISSING
    generate: GenerateSchema = field(default_factory=GenerateSchema)
    experiment_name: str = "prefloop"
    rounds: int = 3
    queries_per_round: int = 500
    seed: int = 0
    runs_dir: str = "runs"
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    fault: FaultSchema = field(default_factory=FaultSchema)
    label: Optional[str] = None  # a run's variant name in an experiment report (set by flows/ablate.py)
    ablation: AblationSchema = field(default_factory=AblationSchema)
    tiny_formats: TinyFormatsSchema = field(default_factory=TinyFormatsSchema)


# Keys that do not change results: left out of the run key so they can vary freely.
# ``rounds`` is out too: round i always uses the i-th slice of queries_per_round queries,
# so asking for more rounds extends a finished run instead of starting over.
# ``generate`` is keyed separately (``generate_key``). ``tiny_formats`` acts only through the
# model.tiny values it sets, which the key includes (a hub model ignores it).
NON_RESULT_KEYS = ("rounds", "runs_dir", "tracking_uri", "experiment_name", "fault", "generate", "label", "ablation",
                   "tiny_formats")

# Options added after runs were keyed, with their off values: the run key leaves an option out
# while it is off, so runs measured before it existed keep their keys (and are reused). Only
# SeVa has a method.temperature that can be 0 (the reasoner's and judge_grpo's are > 0).
KEY_NEUTRAL_DEFAULTS = {("model", "tiny", "sft_skew_steps"): 0, ("model", "tiny", "sft_unanswerable_share"): 0.0,
                        ("train", "optimizer"): "adamw",
                        ("method", "temperature"): 0.0, ("method", "shared_noise"): False}


class ConfigError(ValueError):
    """A composed config that its schema rejects; the message names the key and the fix."""


COMPONENT_GROUPS = ("method", "loss", "judge")


def unknown_key_fix(err) -> str:
    """For OmegaConf's unknown-key error, the closest known key and the fix ('' for other errors)."""
    from omegaconf.errors import ConfigKeyError

    if not isinstance(err, ConfigKeyError) or not dataclasses.is_dataclass(err.object_type):
        return ""
    known = [f.name for f in dataclasses.fields(err.object_type) if f.name != "_target_"]
    close = difflib.get_close_matches(str(err.key), known, n=1)
    guess = f"Did you mean {close[0]!r}? " if close else ""
    return (f"\n{guess}Known keys there: {', '.join(known)}. Fix the key's spelling or drop the override "
            "(a + override adds a key, but nothing reads a key its schema does not declare).")


def validate(cfg) -> None:
    """Re-check a composed config against the schemas, including keys added with ``+key=``
    (Hydra's force-add bypasses struct mode) and each component's own dataclass."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    def check(schema, node, where: str) -> None:
        try:
            OmegaConf.merge(OmegaConf.structured(schema), node)
        except OmegaConfBaseException as err:
            message = err.msg if hasattr(err, "msg") else err
            raise ConfigError(f"invalid config in {where}: {message}{unknown_key_fix(err)}") from None

    plain = OmegaConf.to_container(cfg, resolve=True)
    components = {g: plain.pop(g) for g in COMPONENT_GROUPS}
    check(Config, OmegaConf.create(plain | {g: {} for g in COMPONENT_GROUPS}), "the top-level config")
    check_generate(plain["generate"])
    for group, node in components.items():
        target = node.get("_target_")
        if not target:
            raise ConfigError(f"{group} has no _target_; choose an option with {group}=<name>")
        try:
            cls = get_class(target)
        except Exception as err:
            raise ConfigError(f"{group}._target_={target!r} cannot be imported: {err}") from None
        if dataclasses.is_dataclass(cls):
            check(schema_of(cls), OmegaConf.create(node), f"'{group}' ({target})")
    check_launcher(plain["train"])


def check_launcher(train: dict) -> None:
    """The choices a str field cannot express in the schema (OmegaConf has no Literal type)."""
    if train["launcher"] not in LAUNCHERS:
        raise ConfigError(f"train.launcher={train['launcher']!r} is not one of {', '.join(LAUNCHERS)}")
    if train["optimizer"] not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer={train['optimizer']!r} is not one of {', '.join(OPTIMIZERS)}")
    if train["launcher"] == "accelerate":
        if train["num_processes"] < 1:
            raise ConfigError(f"train.num_processes={train['num_processes']} must be at least 1")
        try:
            accelerate_config_path(train["accelerate_config"])
        except ValueError as err:
            raise ConfigError(str(err)) from None


def check_generate(generate: dict) -> None:
    """Values the schema's types cannot express; vLLM's absence fails here, before any stage."""
    if generate["shards"] < 1:
        raise ConfigError(f"generate.shards={generate['shards']} must be >= 1")
    if generate["task_runner"] not in TASK_RUNNERS:
        raise ConfigError(f"generate.task_runner={generate['task_runner']!r}: choose one of {', '.join(TASK_RUNNERS)}")
    if generate["backend"] not in BACKENDS:
        raise ConfigError(f"generate.backend={generate['backend']!r}: choose one of {', '.join(BACKENDS)}")
    if generate["backend"] == "vllm":
        from models.vllm_sampling import VLLMUnavailable, require_vllm

        try:
            require_vllm()
        except VLLMUnavailable as err:
            raise ConfigError(str(err)) from None


def generate_key(cfg: dict) -> dict:
    """The part of ``generate`` that enters the run key: result-changing keys off their default."""
    generate = cfg.get("generate") or {}
    return {k: generate[k] for k, default in GENERATE_RESULT_DEFAULTS.items() if generate.get(k, default) != default}


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="prefloop_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelSchema)
    cs.store(group="data", name="data_schema", node=DataSchema)
    cs.store(group="data", name="hf_source_schema", node=schema_of(HFSource))
    cs.store(group="eval", name="eval_schema", node=EvalSchema)
    cs.store(group="train", name="train_schema", node=TrainSchema)
    cs.store(group="generate", name="generate_schema", node=GenerateSchema)
    cs.store(group="method", name="seva_schema", node=schema_of(SeVa))
    cs.store(group="method", name="reasoner_schema", node=schema_of(Reasoner))
    cs.store(group="method", name="judge_grpo_schema", node=schema_of(JudgeGRPO))
    cs.store(group="method", name="mpo_schema", node=schema_of(MPO))
    cs.store(group="method", name="uvcot_schema", node=schema_of(UVCoT))
    cs.store(group="method", name="sft_control_schema", node=schema_of(ContinuedSFT))
    cs.store(group="loss", name="dpo_schema", node=schema_of(DPOLoss))
    cs.store(group="loss", name="ipo_schema", node=schema_of(IPOLoss))
    cs.store(group="loss", name="cdpo_schema", node=schema_of(CDPOLoss))
    cs.store(group="loss", name="robust_schema", node=schema_of(RobustDPOLoss))
    cs.store(group="loss", name="hinge_schema", node=schema_of(HingeLoss))
    cs.store(group="loss", name="sdpo_schema", node=schema_of(SDPOLoss))
    cs.store(group="loss", name="bco_schema", node=schema_of(BCOLoss))
    cs.store(group="loss", name="bco_pair_schema", node=schema_of(BCOPairLoss))
    cs.store(group="loss", name="sft_schema", node=schema_of(SFTLoss))
    cs.store(group="loss", name="multi_negative_dpo_schema", node=schema_of(MultiNegativeDPOLoss))
    cs.store(group="loss", name="mpo_schema", node=schema_of(MPOLoss))
    cs.store(group="judge", name="correctness_schema", node=schema_of(CorrectnessJudge))
    cs.store(group="judge", name="grpo_reward_schema", node=schema_of(GRPORewardJudge))
    cs.store(group="judge", name="yesno_schema", node=schema_of(YesNoJudge))
    cs.store(group="judge", name="rating_schema", node=schema_of(RatingJudge))
    cs.store(group="judge", name="anchor_schema", node=schema_of(AnchorJudge))
