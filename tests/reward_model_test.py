"""Reward models: readout, ensembles, sharding, in-graph use, Bradley–Terry training."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm import optim, sft, sharding, testing, tokenizers
from jaxrl_llm.data import builders, pipeline, tasks
from jaxrl_llm.preference import reward_model as rmm
from jaxrl_llm.preference import rm_losses
from jaxrl_llm.rewards.base import RewardInputs
from jaxrl_llm.train_state import create_train_state

TOK = tokenizers.load_tokenizer("builtin")
CFG = testing.tiny_config("qwen3", vocab_size=TOK.vocab_size, hidden_size=32,
                          intermediate_size=64)
OPTS = dict(min_digits=1, max_digits=1, ops="+-", test_fraction=0.3)
PREF_DATA = pipeline.DataConfig(source="preference_arithmetic", max_prompt_len=6,
                                max_completion_len=4)


def preference_examples(examples, seed):
  rng = np.random.default_rng(seed)
  return [{"prompt": e["prompt"], "chosen": e["answer"],
           "rejected": builders.wrong_answer(e["answer"], rng)} for e in examples]


def make_tx(lr, eps=1e-8):
  return optim.make_optimizer(optim.OptimConfig(learning_rate=lr, grad_clip_norm=1.0, eps=eps))


@functools.lru_cache(maxsize=None)
def init_fn(num_heads):
  """A jitted initialiser (eager init runs one small program per op)."""
  return jax.jit(lambda key: rmm.init_reward_model(CFG, key, num_heads))


def test_scores_read_the_last_completion_token():
  params = init_fn(3)(jax.random.key(0))
  assert params["head"].shape == (32, 3)
  # Row 1 is row 0 with junk after the end of the completion (mask 0).
  prompt = np.array([[0, 0, 1, 5, 14, 7, 19]] * 2, np.int32)
  comp = np.array([[8, 2, 0, 0], [8, 2, 9, 9]], np.int32)
  cmask = np.array([[1, 1, 0, 0]] * 2, np.int32)
  s = jax.jit(functools.partial(rmm.reward_scores, CFG))(
      params, prompt, (prompt > 0).astype(np.int32), comp, cmask)
  assert s.shape == (3, 2)
  np.testing.assert_allclose(s[:, 0], s[:, 1], rtol=1e-5, atol=1e-6)
  # The score is the head applied to the final hidden state of the EOS token.
  from jaxrl_llm.models import decoder
  h = jax.jit(functools.partial(decoder.hidden_states, CFG))(
      params["trunk"], jnp.asarray([[1, 5, 14, 7, 19, 8, 2]]))
  np.testing.assert_allclose(s[:, 0], h[0, -1] @ params["head"], rtol=1e-4, atol=1e-5)


def test_ensemble_aggregations_and_in_graph_reward_fn():
  params = init_fn(3)(jax.random.key(1))
  exs = preference_examples(tasks.generate("arithmetic", "train", 6, 0, **OPTS), 0)
  b = pipeline.make_batch(exs, PREF_DATA, tokenizer=TOK)
  inputs = RewardInputs(b["prompt_tokens"], b["prompt_mask"], b["chosen_tokens"],
                        b["chosen_mask"], np.ones(6, bool), {})
  fns = {name: rmm.reward_model_fn(CFG, 3, name, lam=0.5, with_members=True)
         for name in ("mean", "worst_case", "uncertainty_weighted")}

  @jax.jit
  def all_rewards(inputs, rm_params):  # as a step would: params traced, not constants
    return {name: fn(inputs, rm_params) for name, fn in fns.items()}

  out = all_rewards(inputs, params)
  scores_KB = out["mean"][1]["rm_members_BK"].T
  assert scores_KB.shape == (3, 6)
  assert float(jnp.mean(jnp.std(scores_KB, 0))) > 0.05  # heads differ from the start
  want = {"mean": rm_losses.ensemble_mean(scores_KB),
          "worst_case": rm_losses.ensemble_worst_case(scores_KB),
          "uncertainty_weighted": rm_losses.ensemble_uncertainty_weighted(scores_KB, lam=0.5)}
  for name, expected in want.items():
    rewards, comps = out[name]
    np.testing.assert_allclose(rewards, expected, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(comps["rm_mean"], jnp.mean(scores_KB, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(comps["rm_std"], jnp.std(scores_KB, 0), rtol=1e-4, atol=1e-5)
  # New params reuse the compiled program.
  out2 = all_rewards(inputs, init_fn(3)(jax.random.key(2)))
  assert all_rewards._cache_size() == 1
  assert not np.allclose(out2["mean"][0], out["mean"][0])


# ---------------------------------------------------------------------------
# Bradley–Terry training on the synthetic arithmetic pairs.
# ---------------------------------------------------------------------------
# Tied embeddings: the trunk's predicted answer and the embedding of the answer
# actually written share a space, which makes "is this the answer I expect"
# easy to read out at the EOS token.
RM_CFG = testing.tiny_config("llama", vocab_size=TOK.vocab_size, hidden_size=64,
                             intermediate_size=128, tie_embeddings=True)


def sft_trunk(steps):
  """A tiny LM SFT'd on single-digit +/- problems (the RM's initialisation)."""
  train = tasks.generate("arithmetic", "train", 40 * steps, 0, **OPTS)
  tx = make_tx(3e-3)
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  state, _ = create_train_state(RM_CFG, tx, jax.random.key(0), mesh)
  fn = jax.jit(functools.partial(sft.sft_step, cfg=RM_CFG, tx=tx, mesh=mesh),
               donate_argnums=(0,))
  data = pipeline.DataConfig(source="arithmetic", max_prompt_len=6, max_answer_len=4, seq_len=48)
  for i in range(steps):
    rows = pipeline.make_batch(train[40 * i:40 * (i + 1)], data, "sft", tokenizer=TOK)
    state, _ = fn(state, {k: v[:8] for k, v in rows.items()}, jax.random.key(0))
  return jax.device_get(state.params)


def unique_problems(split, seed):
  return list({e["prompt"]: e for e in tasks.generate("arithmetic", split, 3000, seed,
                                                      **OPTS)}.values())


def pairs(problems, seeds):
  batches = [pipeline.make_batch(preference_examples(problems, s), PREF_DATA, tokenizer=TOK)
             for s in seeds]
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_sharded_state_places_the_head_like_the_embedding():
  mesh = sharding.make_mesh(sharding.MeshConfig((2, 2, 2)))
  sh = rmm.reward_model_shardings(CFG, mesh, 3)
  # head [D, K]: D over fsdp like the trunk's embed axis, the K heads replicated.
  assert tuple(sh["head"].spec) == ("fsdp", None)
  assert sh["trunk"]["lm_head"].spec[0] == "fsdp"


def test_bradley_terry_training_reaches_high_held_out_accuracy():
  """BT on train-split pairs, from an SFT'd trunk, 4 heads, chosen-NLL regulariser.

  Held-out pairs are never trained on: fresh draws over the train-split
  problems (new wrong answers), and pairs over the unseen test-split
  problems (the RM must also generalise the arithmetic). Across seeds this
  recipe gave 0.97-0.99 and 0.85-0.93; without the regulariser (sft_coef=0)
  or with fewer heads the unseen-problem accuracy swung between 0.5 and 0.9.
  """
  trunk = sft_trunk(300)
  tx = make_tx(1e-3)
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 1, 1)), jax.devices()[:1])
  state, sh = rmm.create_reward_model_state(RM_CFG, tx, jax.random.key(0), mesh, num_heads=4,
                                            trunk_params=trunk)
  step = rmm.RewardModelStep(RM_CFG, tx, num_heads=4, sft_coef=1.0, mesh=mesh)
  fn = rmm.jit_reward_model_step(step, sh)
  train = tasks.generate("arithmetic", "train", 64 * 200, 1, **OPTS)
  for i in range(200):
    batch = pipeline.make_batch(preference_examples(train[64 * i:64 * (i + 1)], 100 + i),
                                PREF_DATA, tokenizer=TOK)
    state, m = fn(state, batch, jax.random.key(i))

  @jax.jit
  def accuracy(params, batch):
    chosen_KN, rejected_KN = step.pair_scores(params, batch)
    return jnp.mean(rmm.aggregate(chosen_KN) > rmm.aggregate(rejected_KN))

  fresh = float(accuracy(state.params, pairs(unique_problems("train", 9), (15, 16))))
  unseen = float(accuracy(state.params, pairs(unique_problems("test", 1), (5, 6, 7))))
  print(f"held-out pair accuracy: fresh pairs {fresh:.3f}, unseen problems {unseen:.3f}; "
        f"last train batch {float(m['rm/accuracy']):.3f}, head std {float(m['rm/head_std']):.3f}")
  assert fresh > 0.9
  assert unseen > 0.8
  assert float(m["rm/head_std"]) > 0 and np.isfinite(float(m["loss/sft"]))
