"""Experiment configuration: ml_collections at the edge, frozen dataclasses inside.

`configs/*.py` return a ConfigDict; `from_configdict` converts it ONCE into an
`ExperimentConfig` of validated frozen dataclasses. An unknown key or a bad
value raises a ValueError naming the dotted field and the valid choices.
Library code never reads a ConfigDict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Optional, Union

from jaxrl_llm import config_checks
from jaxrl_llm.checkpoint import CheckpointConfig
from jaxrl_llm.data.pipeline import DataConfig
from jaxrl_llm.distill import DistillConfig
from jaxrl_llm.eval import EvalConfig
from jaxrl_llm.lora import LoraConfig
from jaxrl_llm.metrics import MetricsConfig
from jaxrl_llm.optim import OptimConfig
from jaxrl_llm.preference.online import IterativeDPOConfig, OnlineDPOConfig
from jaxrl_llm.preference.sea import SEAConfig
from jaxrl_llm.preference.step import PreferenceConfig
from jaxrl_llm.rl.config import PRESETS, RLConfig
from jaxrl_llm.rl.cooper import CooperConfig
from jaxrl_llm.sharding import MeshConfig

KINDS = ("sft", "rl", "dpo", "reward_model", "online_dpo", "iterative_dpo", "distill")
MODEL_SOURCES = ("builtin", "hf")
NAN_POLICIES = ("skip", "stop")
# Built-in model sizes (vocab comes from the tokenizer). "tiny" learns the
# arithmetic task on a laptop CPU in minutes; "nano" is for unit tests.
BUILTIN_MODELS = {
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 intermediate_size=384, family="qwen3", head_dim=32, qk_norm=True,
                 rope_theta=10000.0, tie_embeddings=True, max_position_embeddings=256),
    # A 3.2M-parameter teacher for distillation into "tiny" (configs/distill_arithmetic.py).
    "small": dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                  intermediate_size=768, family="qwen3", head_dim=32, qk_norm=True,
                  rope_theta=10000.0, tie_embeddings=True, max_position_embeddings=256),
    "nano": dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=64, family="llama", rope_theta=10000.0,
                 tie_embeddings=True, max_position_embeddings=128),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Where the model comes from and its numerics."""
  source: str = "builtin"       # builtin | hf
  builtin: str = "tiny"         # a key of BUILTIN_MODELS
  path: str = ""                # HF checkpoint directory (config.json + safetensors)
  dtype: str = "float32"        # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"
  attention_impl: str = "auto"
  decode_matmul: str = "xla"    # decode steps' weight products: xla | pallas (one GPU)
  float32_logprob_head: bool = False  # the log-prob head's GEMM writes float32 logits
  lora: LoraConfig = LoraConfig()  # low-rank adapters on a frozen base (rank 0: off)

  def __post_init__(self):
    from jaxrl_llm.models.config import DTYPES, dtype_name
    for name in ("dtype", "param_dtype"):  # jnp.bfloat16 etc. are accepted as their names
      object.__setattr__(self, name, dtype_name(getattr(self, name)))
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"model.{name}={getattr(self, name)!r}; choose one of {tuple(DTYPES)}")
    if self.source not in MODEL_SOURCES:
      raise ValueError(f"model.source={self.source!r}; choose one of {MODEL_SOURCES}")
    if self.source == "builtin" and self.builtin not in BUILTIN_MODELS:
      raise ValueError(f"model.builtin={self.builtin!r}; choose one of {tuple(BUILTIN_MODELS)}")
    if self.source == "hf" and not self.path:
      raise ValueError("model.path is required when model.source='hf' (a directory with "
                       "config.json and *.safetensors)")
    if self.source == "hf" and "://" in self.path:
      raise ValueError(f"model.path={self.path!r}: HF checkpoints are read from local disk "
                       "(safetensors maps the files); copy it first, e.g. `gsutil -m cp -r "
                       f"{self.path} /tmp/model`, and pass the local directory")


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  """Weighted reward components by name (see `jaxrl_llm.rewards.registry`)."""
  components: tuple[tuple[str, float], ...] = (("correct", 1.0),)
  # "math": with no \boxed{}, '####' or "the answer is X", take the last number in the completion.
  math_last_number_fallback: bool = False
  # "reward_model" component: the workdir of a finished kind="reward_model" run (its
  # checkpoint gives the params, its stored config the architecture and heads).
  reward_model_path: str = ""
  # How its heads combine into the reward: "" keeps the run's reward_model.aggregation;
  # else mean | worst_case | uncertainty_weighted (conservative ones resist over-optimisation).
  reward_model_aggregation: str = ""

  def __post_init__(self):
    config_checks.require_finite(self, "reward")  # the component weights
    uses_rm = any(name == "reward_model" for name, _ in self.components)
    aggregations = ("", "mean", "worst_case", "uncertainty_weighted")
    if self.reward_model_aggregation not in aggregations:
      raise ValueError(f"reward.reward_model_aggregation={self.reward_model_aggregation!r}; "
                       f"choose one of {aggregations}")
    if self.reward_model_aggregation and not uses_rm:
      raise ValueError("reward.reward_model_aggregation is set but reward.components does not "
                       "use a reward model: add ('reward_model', 1.0) or clear it")
    if uses_rm and not self.reward_model_path:
      raise ValueError("reward.components names 'reward_model' but reward.reward_model_path is "
                       "empty: set it to the workdir of a kind='reward_model' run")
    if self.reward_model_path and not uses_rm:
      raise ValueError(f"reward.reward_model_path={self.reward_model_path!r} is set but "
                       "reward.components does not use it: add ('reward_model', 1.0) to "
                       "reward.components, or clear the path")
    if not isinstance(self.math_last_number_fallback, bool):
      raise ValueError(f"reward.math_last_number_fallback must be True or False, got "
                       f"{self.math_last_number_fallback!r}")


@dataclasses.dataclass(frozen=True)
class SFTWarmstart:
  """An SFT stage run before RL when no checkpoint and no init_from is given."""
  num_steps: int = 0            # 0: no warm-start stage
  learning_rate: float = 3e-3
  batch_size: int = 64

  def __post_init__(self):
    config_checks.require_finite(self, "trainer.sft_warmstart")
    if self.num_steps < 0:
      raise ValueError(f"trainer.sft_warmstart.num_steps must be >= 0, got {self.num_steps}")
    if not 0 < self.learning_rate < math.inf:
      raise ValueError("trainer.sft_warmstart.learning_rate must be a finite number > 0, got "
                       f"{self.learning_rate}")
    if self.batch_size < 1:
      raise ValueError(f"trainer.sft_warmstart.batch_size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
  """Bradley–Terry reward model: K heads on a shared trunk (an ensemble when K > 1)."""
  num_heads: int = 1
  aggregation: str = "mean"     # mean | worst_case | uncertainty_weighted
  lam: float = 0.1              # uncertainty_weighted: mean − λ·variance
  sft_coef: float = 0.0         # NLL on chosen answers as a regulariser (0: off)

  def __post_init__(self):
    config_checks.require_finite(self, "reward_model")
    if self.num_heads < 1:
      raise ValueError(f"reward_model.num_heads must be >= 1, got {self.num_heads}")
    aggregations = ("mean", "worst_case", "uncertainty_weighted")
    if self.aggregation not in aggregations:
      raise ValueError(f"reward_model.aggregation={self.aggregation!r}; choose one of "
                       f"{aggregations}")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  num_steps: int = 100
  log_every: int = 10
  microbatches: int = 1         # gradient accumulation (SFT / preference steps)
  nan_policy: str = "skip"      # skip the update and count it, or stop
  init_from: str = ""           # workdir of an earlier run: start from its latest params
  progress: bool = True
  sft_warmstart: SFTWarmstart = SFTWarmstart()
  split_mode: bool = False      # RL: rollout jit -> host rewards -> update jit
  # Resume even when the workdir's checkpoint was saved under another kind, model, tokenizer
  # or algorithm (see `resume_conflicts`); to start a new stage from a run's weights, give
  # the new run its own workdir and set init_from instead.
  allow_config_change: bool = False
  # RL: > 0 runs the asynchronous actor-learner (jaxrl_llm.rl.actor_learner): the actor samples
  # on this many devices, the learner updates on the rest; 0: the synchronous step on all.
  actor_devices: int = 0

  def __post_init__(self):
    if self.actor_devices < 0:
      raise ValueError(f"trainer.actor_devices must be >= 0, got {self.actor_devices}")
    if self.num_steps < 0:
      raise ValueError(f"trainer.num_steps must be >= 0, got {self.num_steps}")
    if self.log_every < 1:
      raise ValueError(f"trainer.log_every must be >= 1, got {self.log_every}")
    if self.microbatches < 1:
      raise ValueError(f"trainer.microbatches must be >= 1, got {self.microbatches}")
    if self.nan_policy not in NAN_POLICIES:
      raise ValueError(f"trainer.nan_policy={self.nan_policy!r}; choose one of {NAN_POLICIES}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  kind: str = "rl"
  # Model init and every random draw of training (rollouts, minibatch order), the same on any
  # mesh and process count. The data (problems, their order) follow data.seed; the held-out
  # evaluation's draws follow eval.seed.
  seed: int = 0
  model: ModelSpec = ModelSpec()
  data: DataConfig = DataConfig()
  eval: EvalConfig = EvalConfig()
  optim: OptimConfig = OptimConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  rl: RLConfig = RLConfig()
  reward: RewardSpec = RewardSpec()
  trainer: TrainerConfig = TrainerConfig()
  preference: PreferenceConfig = PreferenceConfig()   # kind "dpo"
  online: OnlineDPOConfig = OnlineDPOConfig()         # kind "online_dpo"
  reward_model: RewardModelConfig = RewardModelConfig()  # kind "reward_model"
  metrics: MetricsConfig = MetricsConfig()  # JSONL / TensorBoard / W&B outputs
  iterative: IterativeDPOConfig = IterativeDPOConfig()   # kind "iterative_dpo"
  distill: DistillConfig = DistillConfig()   # kind "distill" (jaxrl_llm.distill)
  sea: SEAConfig = SEAConfig()   # kind "online_dpo": SEA's online ensemble (preference.sea)
  cooper: CooperConfig = CooperConfig()   # kind "rl": co-trained reward model (rl.cooper)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind={self.kind!r}; choose one of {KINDS}")
    from jaxrl_llm.preference import sea as sea_lib
    sea_lib.validate_experiment(self)
    from jaxrl_llm.rl import cooper as cooper_lib
    cooper_lib.validate_experiment(self)
    from jaxrl_llm.rl import depo as depo_lib
    depo_lib.validate_experiment(self)
    uses_rm = any(name == "reward_model" for name, _ in self.reward.components)
    if self.kind == "online_dpo" and self.online.selection == "sea" and not uses_rm:
      raise ValueError("online.selection='sea' draws its pair from a reward-model ensemble: set "
                       "reward.components=(('reward_model', 1.0),) and reward.reward_model_path "
                       "to a kind='reward_model' run with reward_model.num_heads >= 2")
    on = self.online
    if (self.kind == "online_dpo" and on.selection == "dice" and not on.reference_from
        and on.dice_length_penalty == 0):
      raise ValueError("online.selection='dice' ranks by β·log(π_θ/π_ref), which is 0 for every "
                       "response while π_θ = π_ref (the starting policy): no pair would ever "
                       "differ. Start from a preference-trained policy (trainer.init_from) with "
                       "online.reference_from = the model it started from, or set "
                       "online.dice_length_penalty > 0")
    if self.trainer.actor_devices and (self.kind != "rl" or self.trainer.split_mode
                                       or self.rl.advantage == "gae"):
      raise ValueError(f"trainer.actor_devices={self.trainer.actor_devices} runs the "
                       "asynchronous actor-learner, which needs kind='rl' with the one-jit "
                       "stages (trainer.split_mode=False) and a critic-free rl.advantage; set "
                       "trainer.actor_devices=0 for this run")
    if self.kind == "rl" and self.rl.async_lag and not self.trainer.actor_devices:
      raise ValueError(f"rl.async_lag={self.rl.async_lag} needs the actor-learner run: set "
                       "trainer.actor_devices > 0, or rl.async_lag=0")
    if self.kind == "distill" and self.trainer.split_mode:
      raise ValueError("kind='distill' runs the teacher in the compiled step: set "
                       "trainer.split_mode=False")
    if self.kind == "distill" and self.distill.mode == "on_policy" and self.rl.advantage == "gae":
      raise ValueError("distill.mode='on_policy' adds the teacher's advantage to the RL step's, "
                       "not to PPO's critic: choose a critic-free rl.advantage (e.g. 'grpo')")
    if self.kind == "iterative_dpo" and self.iterative.judge == "self" and uses_rm:
      raise ValueError("iterative.judge='self' scores with the policy, so the reward model of "
                       "reward.components is not used: set iterative.judge='reward' to judge "
                       "with it, or drop it from reward.components")
    if self.model.lora.dropout > 0 and self.kind != "sft":
      raise ValueError(f"model.lora.dropout={self.model.lora.dropout} is applied in kind='sft' "
                       f"only: kind={self.kind!r} compares log-probs of the policy at sampling "
                       "and update time (and against the reference), which dropout would "
                       "perturb; set model.lora.dropout=0")
    if self.model.source == "builtin":  # HF models: checked once config.json is read
      check_sequence_lengths(self, BUILTIN_MODELS[self.model.builtin]["max_position_embeddings"],
                             f"model.builtin={self.model.builtin!r}")


def sequence_budgets(cfg: ExperimentConfig) -> list[tuple[str, int]]:
  """The longest sequences a run builds, as (how, tokens), for its kind and evaluation."""
  d = cfg.data
  prompt = f"data.max_prompt_len={d.max_prompt_len}"
  out = []
  if cfg.kind == "sft" or (cfg.kind != "sft" and cfg.trainer.sft_warmstart.num_steps > 0):
    out.append((f"data.seq_len={d.seq_len}", d.seq_len))
  if cfg.kind == "rl" and cfg.rl.multiturn.enabled:
    out.append((f"{prompt} + rl.multiturn turns and observations",
                d.max_prompt_len + cfg.rl.multiturn.completion_len(cfg.rl.max_new_tokens)))
  elif cfg.kind == "rl":
    out.append((f"{prompt} + rl.max_new_tokens={cfg.rl.max_new_tokens}",
                d.max_prompt_len + cfg.rl.max_new_tokens))
  if cfg.kind == "online_dpo":
    out.append((f"{prompt} + online.max_new_tokens={cfg.online.max_new_tokens}",
                d.max_prompt_len + cfg.online.max_new_tokens))
  if cfg.kind == "iterative_dpo":
    out.append((f"{prompt} + iterative.max_new_tokens={cfg.iterative.max_new_tokens}",
                d.max_prompt_len + cfg.iterative.max_new_tokens))
  if cfg.kind == "distill" and cfg.distill.mode == "kd":
    out.append((f"data.seq_len={d.seq_len}", d.seq_len))
  if cfg.kind == "distill" and cfg.distill.mode == "gkd":
    out.append((f"{prompt} + max(distill.max_new_tokens={cfg.distill.max_new_tokens}, "
                f"data.max_answer_len={d.max_answer_len})",
                d.max_prompt_len + max(cfg.distill.max_new_tokens, d.max_answer_len)))
  if cfg.kind == "distill" and cfg.distill.mode == "on_policy":
    out.append((f"{prompt} + rl.max_new_tokens={cfg.rl.max_new_tokens}",
                d.max_prompt_len + cfg.rl.max_new_tokens))
  if cfg.kind in ("dpo", "reward_model"):
    out.append((f"{prompt} + data.max_completion_len={d.max_completion_len}",
                d.max_prompt_len + d.max_completion_len))
  if cfg.eval.num_examples > 0 and cfg.kind != "reward_model":
    out.append((f"{prompt} + eval.max_new_tokens={cfg.eval.max_new_tokens}",
                d.max_prompt_len + cfg.eval.max_new_tokens))
  return out


def check_sequence_lengths(cfg: ExperimentConfig, max_positions: int, model: str) -> None:
  """Refuses sequences longer than the model's max_position_embeddings (RoPE was trained
  on positions below it; the decoder would run past it without a word)."""
  for how, length in sequence_budgets(cfg):
    if length > max_positions:
      raise ValueError(f"{how} gives sequences of {length} tokens, more than the "
                       f"max_position_embeddings={max_positions} of {model}: lower these "
                       "lengths to fit, or use a model with a longer context")


# What a resumed checkpoint must share with the run resuming it: the kind, the model and
# tokenizer, and the algorithm of the kind.
RESUME_FIELDS = ("kind", "model.source", "model.builtin", "model.path", "data.tokenizer")
# The adapters: their shapes, scale s = alpha / rank and kind, and whether the checkpoint
# holds the adapters only (then the frozen base is not in it).
LORA_RESUME_FIELDS = ("model.lora.rank", "model.lora.alpha", "model.lora.target_modules",
                      "model.lora.init", "model.lora.adapter_only_checkpoints")
# An adapter-only checkpoint (`lora.AdapterOnlyCheckpointer`) is resumed on a frozen base
# rebuilt from the current config: everything that base is built from must be the same.
ADAPTER_ONLY_RESUME_FIELDS = ("trainer.init_from", "model.lora.quantize_base",
                              "model.lora.quantize_block_size", "model.lora.full_sft_warmstart",
                              "trainer.sft_warmstart.num_steps", "model.param_dtype")
RESUME_FIELDS_OF_KIND = {
    "rl": ("rl.advantage", "rl.policy_loss", "rl.length_shaping"),
    "dpo": ("preference.losses",),
    "online_dpo": ("online.selection", "online.preference.losses", "sea.enabled"),
    "iterative_dpo": ("iterative.judge", "iterative.preference.losses"),
    "reward_model": ("reward_model.num_heads",),
    "distill": ("distill.mode", "distill.teacher_source", "distill.teacher_builtin",
                "distill.teacher_path"),
}


def _dotted(tree: Any, name: str) -> Any:
  for key in name.split("."):
    if not isinstance(tree, dict) or key not in tree:
      return "<not set>"
    tree = tree[key]
  return tree


def _adapter_only_fields(saved: dict, cfg: ExperimentConfig) -> tuple[str, ...]:
  """`ADAPTER_ONLY_RESUME_FIELDS` when the saved run or this one keeps adapter-only
  checkpoints, plus `seed` when the base is a built-in model's random init (no init_from,
  no SFT warm-start); else ()."""
  if not (_dotted(saved, "model.lora.adapter_only_checkpoints") is True
          or cfg.model.lora.adapter_only_checkpoints):
    return ()
  random_base = (cfg.model.source == "builtin" and not cfg.trainer.init_from
                 and cfg.trainer.sft_warmstart.num_steps == 0)
  return ADAPTER_ONLY_RESUME_FIELDS + (("seed",) if random_base else ())


def resume_conflicts(saved: dict, cfg: ExperimentConfig) -> list[str]:
  """How the config stored with a checkpoint (`to_dict` form) differs from `cfg` where a
  resume needs them equal, one "field: saved X, now Y" line each.

  The fields: `RESUME_FIELDS`, those of the kind (`RESUME_FIELDS_OF_KIND`), the adapters'
  (`LORA_RESUME_FIELDS`) and, for adapter-only checkpoints, what the frozen base is built
  from (`ADAPTER_ONLY_RESUME_FIELDS`). A LoRA or adapter-only field missing from an older
  snapshot compares as its default.
  """
  now = json.loads(json.dumps(to_dict(cfg)))  # tuples as lists, like the stored snapshot
  defaults = json.loads(json.dumps(to_dict(ExperimentConfig())))
  names = RESUME_FIELDS + RESUME_FIELDS_OF_KIND.get(cfg.kind, ())
  if cfg.model.source == "builtin":
    names = tuple(n for n in names if n != "model.path")
  else:
    names = tuple(n for n in names if n != "model.builtin")
  newer = LORA_RESUME_FIELDS + _adapter_only_fields(saved, cfg)
  names += tuple(n for n in newer if n not in names)

  def saved_value(name):
    value = _dotted(saved, name)
    return _dotted(defaults, name) if value == "<not set>" and name in newer else value

  return [f"{name}: saved {saved_value(name)!r}, now {_dotted(now, name)!r}"
          for name in names if saved_value(name) != _dotted(now, name)]


# ---------------------------------------------------------------------------
# Conversion.
# ---------------------------------------------------------------------------
def _convert(tp, value, path):
  origin = typing.get_origin(tp)
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    return from_dict(tp, value, path)
  if origin in (Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None:
      return None
    return _convert(args[0], value, path) if len(args) == 1 else value
  if origin is tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
      raise ValueError(f"{path} must be a sequence, got {value!r}")
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
  if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
    if not math.isfinite(value):
      raise ValueError(f"{path}={value!r} must be a finite number")
    return float(value)
  if tp is dict or origin is dict:
    return dict(_to_plain(value))
  return value


def _to_plain(value):
  if hasattr(value, "to_dict"):
    return value.to_dict()
  return value


def from_dict(cls, data, path: str = "config"):
  """Build dataclass `cls` from a mapping, recursively, with clear errors."""
  data = _to_plain(data)
  if not isinstance(data, dict):
    raise ValueError(f"{path} must be a mapping of fields for {cls.__name__}, got {data!r}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  data = dict(data)
  unknown = sorted(set(data) - set(fields))
  if unknown:
    raise ValueError(f"{path}: unknown field(s) {unknown}; valid fields are {sorted(fields)}")
  hints = typing.get_type_hints(cls)
  kwargs = {k: _convert(hints[k], v, f"{path}.{k}") for k, v in data.items()}
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from e


def from_configdict(config: Any) -> ExperimentConfig:
  """Convert a (possibly locked) ml_collections ConfigDict into an ExperimentConfig."""
  return from_dict(ExperimentConfig, config, "config")


def to_dict(cfg: Any) -> Any:
  """JSON-friendly snapshot of a config (stored with every checkpoint)."""
  if dataclasses.is_dataclass(cfg):
    return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
  if isinstance(cfg, (tuple, list)):
    return [to_dict(v) for v in cfg]
  if isinstance(cfg, dict):
    return {k: to_dict(v) for k, v in cfg.items()}
  return cfg


def default_configdict(rl_preset: Optional[str] = None, **overrides):
  """An ml_collections ConfigDict holding every field at its default.

  Config files start from this and set what their recipe needs; field
  comments live on the dataclasses (ModelSpec, DataConfig, RLConfig, ...).
  `rl_preset` fills the rl section from `jaxrl_llm.rl.config.PRESETS` first,
  so that any later assignment in the config file (or a --config.rl.x flag)
  overrides the preset.
  """
  import ml_collections
  tree = to_dict(ExperimentConfig())
  if rl_preset is not None:
    if rl_preset not in PRESETS:
      raise ValueError(f"rl_preset={rl_preset!r}; choose one of {tuple(PRESETS)}")
    tree["rl"] = to_dict(RLConfig(**PRESETS[rl_preset]))
  tree["mesh"].pop("rules")  # the default rules; set mesh.rules to override
  for key, value in overrides.items():
    tree[key] = value
  return ml_collections.ConfigDict(_placeholders(ExperimentConfig, _tuples(tree)))


def _placeholders(cls, tree: dict) -> dict:
  """None fields become typed ml_collections placeholders, so a flag such as
  --config.eval.temperature=0.7 can set them (ml_collections cannot type a bare None)."""
  from ml_collections import config_dict
  hints = typing.get_type_hints(cls)
  out = dict(tree)
  for f in dataclasses.fields(cls):
    tp, value = hints[f.name], out.get(f.name)
    if f.name not in out:
      continue
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
      out[f.name] = _placeholders(tp, value)
    elif value is None and typing.get_origin(tp) in (Union, types.UnionType):
      args = [a for a in typing.get_args(tp) if a is not type(None)]
      if len(args) == 1 and args[0] in (int, float, str, bool):
        out[f.name] = config_dict.placeholder(args[0])
  return out


def use_builtin_task(c, source: str = "arithmetic", *, max_digits: int = 2,
                     batch_size: int = 32, num_train: int = 20000, num_test: int = 500):
  """Point a ConfigDict's data and eval sections at a built-in synthetic task.

  Lengths fit the character-level built-in tokenizer: prompts of at most 12
  tokens (BOS + "99+99="), answers and completions of at most 6 (digits + EOS).
  """
  c.data.source = source
  c.data.num_train, c.data.num_test = num_train, num_test
  c.data.task_options = (("max_digits", max_digits),)
  c.data.batch_size = batch_size
  c.data.max_prompt_len = 12
  c.data.max_answer_len = 6
  c.data.max_completion_len = 6
  c.data.seq_len = 64              # SFT (warm-start) packed rows
  c.eval.num_examples = 256
  c.eval.max_new_tokens = 6
  return c


def arithmetic_rl_recipe(*, kind: str = "rl", rl_preset: str = "grpo", sft_steps: int = 400,
                         rl_steps: int = 150, batch_size: int = 32):
  """The quickstart's recipe (configs/quickstart.py) as a ConfigDict to start from.

  Stage 1: `sft_steps` SFT warm-start steps of the built-in tiny model on 1-2
  digit addition/subtraction; stage 2: `rl_steps` steps of `batch_size`
  prompts x 8 completions with the 0/1 `correct` reward. The PPO, LoRA,
  async and distillation recipes start here and override what they vary.
  """
  c = default_configdict(kind=kind, rl_preset=rl_preset)
  use_builtin_task(c, "arithmetic", max_digits=2, batch_size=batch_size, num_train=50000,
                   num_test=1000)
  c.eval.num_examples = 512
  c.eval.batch_size = 256
  c.eval.every_steps = 50
  c.rl.group_size = 8
  c.rl.max_new_tokens = 6
  c.rl.kl_coef = 0.0                # no reference forward: faster on CPU
  c.reward.components = (("correct", 1.0),)
  c.optim.learning_rate = 3e-5      # RL moves a converged SFT model gently
  c.optim.warmup_steps = 10         # Adam's first steps are sign-like: ramp up
  c.optim.grad_clip_norm = 1.0
  c.checkpoint.save_interval_steps = 50
  c.trainer.num_steps = rl_steps
  c.trainer.log_every = 5
  c.trainer.sft_warmstart.num_steps = sft_steps
  c.trainer.sft_warmstart.learning_rate = 3e-3
  c.trainer.sft_warmstart.batch_size = 64
  return c


def _tuples(tree):
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(v) for v in tree)
  return tree


def parse_arg(arg: Optional[str], **defaults) -> dict:
  """`--config=configs/x.py:steps=10,tiny=true` -> dict over `defaults` (typed)."""
  out = dict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    key, _, value = item.partition("=")
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}; valid: {sorted(out)}")
    if isinstance(defaults[key], bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(defaults[key])(value)
  return out


def builtin_model_config(spec: ModelSpec, vocab_size: int):
  from jaxrl_llm.models.config import ModelConfig
  return ModelConfig(vocab_size=vocab_size, dtype=spec.dtype, param_dtype=spec.param_dtype,
                     remat=spec.remat, attention_impl=spec.attention_impl, lora=spec.lora,
                     decode_matmul=spec.decode_matmul,
                     float32_logprob_head=spec.float32_logprob_head,
                     **BUILTIN_MODELS[spec.builtin])
