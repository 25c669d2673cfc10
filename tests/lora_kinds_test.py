"""LoRA through every trainer kind, from a config (nano model, 2 steps each):
the frozen base never changes between checkpoints, the adapters do, and the
implicit reference (adapters off) equals the policy at step 0."""
import json
import math
import os

import jax
import numpy as np
import pytest

from jaxrl_llm import config as config_lib
from jaxrl_llm import lora, sharding, trainer, tree_paths
from jaxrl_llm.checkpoint import Checkpointer
from jaxrl_llm.train_state import param_shardings


def _experiment(kind, source="arithmetic", **lora_kw):
  c = config_lib.default_configdict(kind=kind)
  c.model.builtin = "nano"
  c.data.source = source
  c.data.num_train, c.data.num_test = 64, 8
  c.data.batch_size = 8
  c.data.max_prompt_len, c.data.max_answer_len, c.data.max_completion_len = 12, 6, 6
  c.data.seq_len = 32
  c.eval.num_examples = 0
  c.checkpoint.async_save = False
  c.checkpoint.save_interval_steps = 1
  c.optim.learning_rate = 1e-2
  c.trainer.num_steps = 2
  c.trainer.log_every = 1
  c.trainer.progress = False
  c.model.lora.rank = 4
  for k, v in lora_kw.items():
    setattr(c.model.lora, k, v)
  return c


def _run(c, workdir):
  cfg = config_lib.from_configdict(c)
  trainer.run(cfg, os.fspath(workdir))
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  return cfg, [r for r in rows if r["step"] > 0]


def _lm_params(cfg, workdir, step):
  from jaxrl_llm.tokenizers import load_tokenizer
  model_cfg = trainer.model_config(cfg, load_tokenizer(cfg.data.tokenizer))
  mesh = sharding.make_mesh(cfg.mesh)
  abstract = trainer._abstract_params(model_cfg, param_shardings(model_cfg, mesh))
  return jax.device_get(Checkpointer(workdir, create=False).restore_params(abstract, step=step))


def _assert_base_frozen_adapters_moved(p1, p2):
  moved = 0
  for path, a in tree_paths.flatten(p1).items():
    b = tree_paths.flatten(p2)[path]
    if lora.is_trainable(path):
      moved += not np.array_equal(a, b)
    else:
      np.testing.assert_array_equal(a, b, err_msg=path)
  assert moved > 0


def test_dpo_with_lora_starts_at_log2_and_trains_adapters_only(tmp_path):
  c = _experiment("dpo", "preference_arithmetic")
  c.preference.losses = (("dpo", 1.0),)
  cfg, rows = _run(c, tmp_path)
  # Step 1: B = 0, so the policy is its reference (the frozen base): every margin is 0.
  assert rows[0]["loss/dpo"] == pytest.approx(math.log(2.0), abs=1e-6)
  assert rows[1]["loss/dpo"] != pytest.approx(math.log(2.0), abs=1e-6)
  _assert_base_frozen_adapters_moved(_lm_params(cfg, tmp_path, 1), _lm_params(cfg, tmp_path, 2))


def test_online_dpo_with_lora(tmp_path):
  c = _experiment("online_dpo")
  c.online.num_samples, c.online.max_new_tokens = 4, 4
  c.reward.components = (("correct", 1.0), ("format", 1.0))
  cfg, rows = _run(c, tmp_path)
  assert {r["step"] for r in rows} == {1, 2}
  assert all(np.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
  _assert_base_frozen_adapters_moved(_lm_params(cfg, tmp_path, 1), _lm_params(cfg, tmp_path, 2))


def test_reward_model_with_lora_trains_adapters_and_the_head(tmp_path):
  c = _experiment("reward_model", "preference_arithmetic")
  cfg, rows = _run(c, tmp_path)
  assert {r["step"] for r in rows} == {1, 2}
  from jaxrl_llm.preference import reward_model as rm_lib
  from jaxrl_llm.tokenizers import load_tokenizer
  model_cfg = trainer.model_config(cfg, load_tokenizer(cfg.data.tokenizer))
  ckpt = Checkpointer(tmp_path, create=False)
  heads = cfg.reward_model.num_heads
  abstract = jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
      rm_lib.reward_model_shapes(model_cfg, heads),
      rm_lib.reward_model_shardings(model_cfg, sharding.make_mesh(cfg.mesh), heads))
  p1, p2 = (jax.device_get(ckpt.restore_params(abstract, step=s)) for s in (1, 2))
  _assert_base_frozen_adapters_moved(p1, p2)
  head = [k for k in tree_paths.flatten(p1) if lora.is_trainable(k) and not lora.is_adapter(k)]
  assert head and any(not np.array_equal(tree_paths.flatten(p1)[k], tree_paths.flatten(p2)[k])
                      for k in head)


def test_rl_split_mode_with_lora_equals_one_jit(tmp_path):
  c = _experiment("rl")
  c.rl.group_size, c.rl.max_new_tokens, c.rl.kl_coef = 4, 4, 0.05
  c.reward.components = (("correct", 1.0), ("format", 1.0))
  cfg, one = _run(c, tmp_path / "one")
  c.trainer.split_mode = True
  cfg_split, split = _run(c, tmp_path / "split")
  for k in ("reward/mean", "loss/policy", "rl/approx_kl"):
    np.testing.assert_allclose([r[k] for r in split if k in r], [r[k] for r in one if k in r],
                               rtol=1e-4, atol=1e-6, err_msg=k)
  p1, p2 = _lm_params(cfg, tmp_path / "split", 1), _lm_params(cfg, tmp_path / "split", 2)
  _assert_base_frozen_adapters_moved(p1, p2)


def test_sft_with_lora_dropout_from_a_config(tmp_path):
  c = _experiment("sft", dropout=0.5)
  cfg, rows = _run(c, tmp_path)
  assert cfg.model.lora.dropout == 0.5
  _assert_base_frozen_adapters_moved(_lm_params(cfg, tmp_path, 1), _lm_params(cfg, tmp_path, 2))


def test_adapter_only_checkpoints_hold_adapters_and_resume_exactly(tmp_path, capsys):
  def cfg_dict(steps):
    c = _experiment("sft", adapter_only_checkpoints=True)
    c.checkpoint.save_interval_steps = 2
    c.trainer.num_steps = steps
    return c

  cfg, _ = _run(cfg_dict(4), tmp_path / "straight")
  _run(cfg_dict(2), tmp_path / "resumed")
  _run(cfg_dict(4), tmp_path / "resumed")
  assert "Resuming from step 2" in capsys.readouterr().out
  from jaxrl_llm.tokenizers import load_tokenizer
  model_cfg = trainer.model_config(cfg, load_tokenizer(cfg.data.tokenizer))
  mesh = sharding.make_mesh(cfg.mesh)
  full = trainer._abstract_params(model_cfg, param_shardings(model_cfg, mesh))
  adapters = lora.trainable_params(full)
  a, b = (jax.device_get(Checkpointer(tmp_path / d, create=False).restore_params(adapters))
          for d in ("straight", "resumed"))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert set(tree_paths.flatten(a)) == {f"layers/{t}{s}" for t in lora.TARGETS
                                   for s in (lora.A_SUFFIX, lora.B_SUFFIX)}
  with pytest.raises(ValueError, match="no saved state.params"):  # no frozen base saved
    Checkpointer(tmp_path / "straight", create=False).restore_params(full)
