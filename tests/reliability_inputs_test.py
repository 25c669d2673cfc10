"""Bad inputs give an error a user can act on, never silent wrong behaviour.

A checkpoint that lost its checksum manifest, damaged PEFT adapter and HF config
files, non-finite hyper-parameters set in Python, secondary models (teacher,
critic, reward model) shorter than the run's sequences, and resuming an
adapter-only checkpoint onto another frozen base.
"""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import config_checks, distill, lora, sharding, testing
from jaxrl_llm.checkpoint import CheckpointConfig, Checkpointer, CorruptCheckpointError
from jaxrl_llm.models import decoder, hf
from jaxrl_llm.models import peft as peft_io
from jaxrl_llm.preference import reward_model as rm_lib
from jaxrl_llm.rewards.base import RewardInputs
from jaxrl_llm.rl import critic as critic_lib
from jaxrl_llm.rl.config import RLConfig
from jaxrl_llm.tokenizers import load_tokenizer


# ---------------------------------------------------------------------------
# Checkpoints without their checksum manifest.
# ---------------------------------------------------------------------------
def _saved_checkpoint(workdir, state):
  with Checkpointer(workdir, CheckpointConfig(async_save=False)) as ckpt:
    assert ckpt.save(1, state, extra={"note": "x"}, force=True)
  return workdir / "checkpoints" / "1"


def _state():
  return {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones((3,), jnp.float32)}


def _zero_params(cfg):
  """Params of `cfg` filled with zeros: the files under test need shapes, not values (and a
  random init compiles for seconds on CPU)."""
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), decoder.param_shapes(cfg))


def _restore(workdir, cfg=None, target=None):
  with Checkpointer(workdir, cfg or CheckpointConfig(async_save=False), create=False) as ckpt:
    return ckpt.restore(target or _state())


def test_checkpoint_that_lost_its_manifest_is_refused_with_the_fix(tmp_path, capsys):
  step_dir = _saved_checkpoint(tmp_path, _state())
  shutil.rmtree(step_dir / "checksums")
  with pytest.raises(CorruptCheckpointError) as e:
    _restore(tmp_path)
  message = str(e.value)
  assert str(step_dir) in message and "was saved with a checksum manifest" in message
  assert "allow_unverified_restore=True" in message and "No earlier checkpoint" in message
  # The explicit opt-out restores it, and says so where the user sees it.
  state, extra = _restore(tmp_path, CheckpointConfig(async_save=False,
                                                     allow_unverified_restore=True))
  np.testing.assert_array_equal(state["w"], _state()["w"])
  assert extra == {"note": "x"}
  assert "restoring it unverified" in capsys.readouterr().err


def test_checkpoint_from_before_manifests_restores_with_a_printed_warning(tmp_path, capsys):
  step_dir = _saved_checkpoint(tmp_path, _state())
  shutil.rmtree(step_dir / "checksums")
  meta_file = step_dir / "_CHECKPOINT_METADATA"  # as an older version wrote it
  meta = json.loads(meta_file.read_text())
  meta["item_handlers"].pop("checksums")
  meta["custom_metadata"] = {}
  meta_file.write_text(json.dumps(meta))
  state, _ = _restore(tmp_path)
  np.testing.assert_array_equal(state["b"], _state()["b"])
  err = capsys.readouterr().err
  assert "has no checksum manifest" in err and str(step_dir) in err and "unverified" in err


def test_allow_unverified_restore_must_be_a_bool():
  with pytest.raises(ValueError, match="allow_unverified_restore='yes' must be True or False"):
    CheckpointConfig(allow_unverified_restore="yes")


def test_leaves_restored_into_another_dtype_are_named_in_a_printed_warning(tmp_path, capsys):
  _saved_checkpoint(tmp_path, _state())
  target = dict(_state(), w=jnp.zeros((2, 3), jnp.bfloat16))
  state, _ = _restore(tmp_path, target=target)
  assert state["w"].dtype == jnp.bfloat16
  err = capsys.readouterr().err
  assert "1 leaves restored into another dtype" in err and "w" in err


# ---------------------------------------------------------------------------
# PEFT adapter files and the HF critic's config.json.
# ---------------------------------------------------------------------------
@pytest.fixture
def adapter(tmp_path):
  """(model config, base params, adapter dir) of a rank-2 adapter on the tiny llama model."""
  cfg = testing.tiny_config("llama")
  base = _zero_params(cfg)
  lcfg = lora.LoraConfig(rank=2, alpha=4.0, target_modules=("q", "v"))
  params = lora.add_adapters(lcfg, base, jax.random.key(1))
  out = peft_io.save_peft(cfg.replace(lora=lcfg), params, tmp_path / "adapter")
  return cfg, base, out


def test_peft_adapter_round_trip_still_loads(adapter):
  cfg, base, out = adapter
  cfg2, params = peft_io.load_peft(cfg, base, out)
  assert cfg2.lora.rank == 2 and cfg2.lora.target_modules == ("q", "v")
  assert lora.has_adapters(params)


def test_corrupt_adapter_config_names_the_file(adapter):
  cfg, base, out = adapter
  file = out / peft_io.ADAPTER_CONFIG_NAME
  file.write_text(file.read_text()[:25])
  with pytest.raises(ValueError, match="adapter_config.json is not valid JSON") as e:
    peft_io.load_peft(cfg, base, out)
  assert str(file) in str(e.value) and "copy" in str(e.value)
  file.write_text("[1, 2]")
  with pytest.raises(ValueError, match="holds a JSON list, not an object"):
    peft_io.read_adapter_config(out)


@pytest.mark.parametrize("key", peft_io.REQUIRED_KEYS)
def test_adapter_config_without_a_required_key_names_it(adapter, key):
  _, _, out = adapter
  file = out / peft_io.ADAPTER_CONFIG_NAME
  c = json.loads(file.read_text())
  del c[key]
  file.write_text(json.dumps(c))
  with pytest.raises(ValueError, match=f"has no '{key}'") as e:
    peft_io.read_adapter_config(out)
  assert str(file) in str(e.value) and "re-save the adapter" in str(e.value)


@pytest.mark.parametrize("r", ["4", 0, 2.5, True])
def test_adapter_rank_that_is_not_a_whole_number_is_refused(adapter, r):
  _, _, out = adapter
  file = out / peft_io.ADAPTER_CONFIG_NAME
  file.write_text(json.dumps(dict(json.loads(file.read_text()), r=r)))
  with pytest.raises(ValueError, match="r="):
    peft_io.read_adapter_config(out)


def test_truncated_adapter_weights_name_the_file(adapter):
  cfg, base, out = adapter
  file = out / peft_io.ADAPTER_WEIGHTS_NAME
  data = file.read_bytes()
  file.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="not a readable safetensors file") as e:
    peft_io.load_peft(cfg, base, out)
  assert str(file) in str(e.value)


def test_corrupt_critic_config_names_the_file(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_')
  with pytest.raises(ValueError, match="config.json is not valid JSON") as e:
    critic_lib.hf_value_model_config(str(tmp_path), dtype="float32", param_dtype="float32",
                                     remat="none", attention_impl="auto")
  assert str(tmp_path / "config.json") in str(e.value)


# ---------------------------------------------------------------------------
# Non-finite hyper-parameters set in Python.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("make,field", [
    (lambda v: RLConfig(temperature=v), "rl.temperature"),
    (lambda v: RLConfig(kl_coef=v), "rl.kl_coef"),
    (lambda v: RLConfig(eps_high=v), "rl.eps_high"),
    (lambda v: distill.DistillConfig(coef=v), "distill.coef"),
    (lambda v: config_lib.RewardModelConfig(lam=v), "reward_model.lam"),
    (lambda v: config_lib.SFTWarmstart(learning_rate=v), "trainer.sft_warmstart.learning_rate"),
    (lambda v: config_lib.RewardSpec(components=(("correct", v),)), r"reward.components\[0\]\[1\]"),
])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_direct_construction_with_a_nonfinite_value_is_refused(make, field, value):
  with pytest.raises(ValueError, match=f"{field}={value!r} must be a finite number"):
    make(value)


@dataclasses.dataclass(frozen=True)
class _Bounds:
  low: float = 0.0
  high: float = float("inf")  # "no upper bound"


def test_inf_is_allowed_only_where_exempted_by_name():
  config_checks.require_finite(_Bounds(), "bounds", allow_inf=("high",))
  with pytest.raises(ValueError, match="bounds.high=inf must be a finite number"):
    config_checks.require_finite(_Bounds(), "bounds")
  with pytest.raises(ValueError, match="bounds.high=nan must be a finite number .NaN is never"):
    config_checks.require_finite(_Bounds(high=float("nan")), "bounds", allow_inf=("high",))
  with pytest.raises(ValueError, match="bounds.low=-inf"):
    config_checks.require_finite(_Bounds(low=float("-inf")), "bounds", allow_inf=("high",))
  with pytest.raises(ValueError, match=r"allow_inf names \['hihg'\], which are not fields"):
    config_checks.require_finite(_Bounds(), "bounds", allow_inf=("hihg",))


# ---------------------------------------------------------------------------
# Secondary models' sequence lengths.
# ---------------------------------------------------------------------------
def _run_config(kind="rl", max_new_tokens=8, **kw):
  """A nano run: prompts of 12 tokens, evaluation up to 12 + 100 (the student only)."""
  return config_lib.ExperimentConfig(
      kind=kind, model=config_lib.ModelSpec(builtin="nano"),
      data=dataclasses.replace(config_lib.DataConfig(), max_prompt_len=12),
      eval=dataclasses.replace(config_lib.EvalConfig(), max_new_tokens=100),
      rl=RLConfig(max_new_tokens=max_new_tokens, **kw))


def _short_hf_model(tmp_path, max_positions=32):
  vocab = load_tokenizer("builtin").vocab_size
  cfg = testing.tiny_config("qwen2", vocab_size=vocab, max_position_embeddings=max_positions)
  return str(hf.save_hf(cfg, _zero_params(cfg), tmp_path / "short"))


def _mesh():
  return sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])


def test_secondary_models_are_checked_against_the_scored_sequences_only():
  ok = _run_config(max_new_tokens=20)  # 12 + 20 = 32; eval's 112 tokens are the student's
  config_checks.check_secondary_model_lengths(ok, 32, "the test model")
  with pytest.raises(ValueError, match=r"rl.max_new_tokens=21 gives sequences of 33 tokens, "
                                       "more than the max_position_embeddings=32 of the test"):
    config_checks.check_secondary_model_lengths(_run_config(max_new_tokens=21), 32,
                                                "the test model")


def _load_teacher(path, run_config):
  tok = load_tokenizer("builtin")
  d = distill.DistillConfig(mode="on_policy", teacher_source="hf", teacher_path=path)

  def model_config_fn(spec):
    return hf.config_from_hf(hf._read_json(hf.Path(spec.path) / "config.json"))

  return distill.load_teacher(d, mesh=_mesh(), rules=sharding.DEFAULT_RULES, tokenizer=tok,
                              tokenizer_name="builtin", model_config_fn=model_config_fn,
                              run_config=run_config)


def test_teacher_shorter_than_the_run_is_refused(tmp_path):
  path = _short_hf_model(tmp_path)
  with pytest.raises(ValueError, match=r"sequences of 40 tokens, more than the "
                                       r"max_position_embeddings=32 of the distillation "
                                       f"teacher '{path}'"):
    _load_teacher(path, _run_config("distill", max_new_tokens=28))
  teacher = _load_teacher(path, _run_config("distill", max_new_tokens=20))
  assert teacher.model.max_position_embeddings == 32


def test_teacher_forward_past_its_positions_is_refused_at_trace_time():
  teacher = testing.tiny_config("llama", max_position_embeddings=16)
  distill.require_teacher_positions(teacher, 16)
  with pytest.raises(ValueError, match="the distillation teacher is given sequences of 17 "
                                       "tokens, more than its max_position_embeddings=16"):
    distill.require_teacher_positions(teacher, 17)


def test_critic_shorter_than_the_run_is_refused(tmp_path):
  path = _short_hf_model(tmp_path)
  kw = dict(dtype="float32", param_dtype="float32", remat="none", attention_impl="auto",
            vocab_size=load_tokenizer("builtin").vocab_size, mesh=_mesh())
  long_run = _run_config(max_new_tokens=24, advantage="gae")
  with pytest.raises(ValueError, match=r"rl.max_new_tokens=24 gives sequences of 36 tokens, "
                                       r"more than the max_position_embeddings=32 of the critic "
                                       f"rl.critic.hf_path='{path}'"):
    critic_lib.load_hf_value_model(path, run_config=long_run, **kw)
  cfg, _ = critic_lib.load_hf_value_model(path, run_config=_run_config(advantage="gae"), **kw)
  # Called without the run's config, the value forward refuses the long rows itself.
  params = critic_lib.init_critic_params(cfg, decoder.param_shapes(cfg))
  rows = {"prompt_tokens": jnp.zeros((1, 12), jnp.int32), "prompt_mask": jnp.ones((1, 12)),
          "completion": jnp.zeros((1, 24), jnp.int32), "completion_mask": jnp.ones((1, 24))}
  with pytest.raises(ValueError, match="the critic .value model. is given sequences of 36"):
    jax.eval_shape(lambda p, r: critic_lib.token_values(cfg, p, None, r), params, rows)


def test_reward_model_forward_past_its_positions_is_refused():
  cfg = testing.tiny_config("llama", max_position_embeddings=16)
  fn = rm_lib.reward_model_fn(cfg, 1)
  params = jax.eval_shape(lambda: rm_lib.init_reward_model(cfg, jax.random.key(0)))
  inputs = RewardInputs(prompt_tokens_BP=jnp.zeros((1, 8), jnp.int32),
                        prompt_mask_BP=jnp.ones((1, 8)),
                        completion_BL=jnp.zeros((1, 9), jnp.int32),
                        completion_mask_BL=jnp.ones((1, 9)),
                        finished_B=jnp.ones((1,), bool), task={})
  with pytest.raises(ValueError, match="the reward model .reward.reward_model_path. is given "
                                       "sequences of 17 tokens"):
    jax.eval_shape(fn, inputs, params)


# ---------------------------------------------------------------------------
# Resuming an adapter-only checkpoint onto another frozen base.
# ---------------------------------------------------------------------------
def _lora_run(adapter_only=True, init_from="", **lora_kw):
  lcfg = lora.LoraConfig(rank=4, adapter_only_checkpoints=adapter_only, **lora_kw)
  return config_lib.ExperimentConfig(
      model=config_lib.ModelSpec(builtin="nano", lora=lcfg),
      trainer=config_lib.TrainerConfig(init_from=init_from))


def _snapshot(cfg):
  return json.loads(json.dumps(config_lib.to_dict(cfg)))


def test_adapter_only_resume_onto_another_base_lists_the_differences():
  saved = _snapshot(_lora_run(init_from="/runs/sft_a"))
  assert config_lib.resume_conflicts(saved, _lora_run(init_from="/runs/sft_a")) == []
  conflicts = config_lib.resume_conflicts(
      saved, _lora_run(init_from="/runs/sft_b", quantize_base="int8"))
  assert "trainer.init_from: saved '/runs/sft_a', now '/runs/sft_b'" in conflicts
  assert "model.lora.quantize_base: saved 'none', now 'int8'" in conflicts
  # A random built-in base is rebuilt from the seed.
  assert config_lib.resume_conflicts(_snapshot(_lora_run()), dataclasses.replace(
      _lora_run(), seed=1)) == ["seed: saved 0, now 1"]


def test_lora_shape_and_checkpoint_kind_must_match_on_resume():
  saved = _snapshot(_lora_run(adapter_only=False))
  conflicts = config_lib.resume_conflicts(
      saved, _lora_run(adapter_only=False, target_modules=("q", "v")))
  assert conflicts == ["model.lora.target_modules: saved ['q', 'k', 'v', 'o', 'gate', 'up', "
                       "'down'], now ['q', 'v']"]
  conflicts = config_lib.resume_conflicts(saved, _lora_run(adapter_only=True))
  assert "model.lora.adapter_only_checkpoints: saved False, now True" in conflicts
  # Full checkpoints hold the whole state: a moved init_from does not matter.
  assert config_lib.resume_conflicts(
      saved, _lora_run(adapter_only=False, init_from="/elsewhere")) == []


def test_snapshot_from_before_lora_fields_compares_as_the_defaults():
  saved = _snapshot(config_lib.ExperimentConfig(model=config_lib.ModelSpec(builtin="nano")))
  del saved["model"]["lora"]
  now = config_lib.ExperimentConfig(model=config_lib.ModelSpec(builtin="nano"))
  assert config_lib.resume_conflicts(saved, now) == []
  assert config_lib.resume_conflicts(saved, _lora_run(adapter_only=False)) == [
      "model.lora.rank: saved 0, now 4"]
