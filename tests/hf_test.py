"""Hugging Face interop: config mapping, safetensors load / save, logit parity.

Random tiny `transformers` models (CPU torch, float32) are the reference:
a checkpoint they save must give the same logits through `load_hf` +
`forward`, and a checkpoint `save_hf` writes must load back into
`transformers` with the same logits.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxrl_llm import testing
from jaxrl_llm.models import ModelConfig, RopeScaling, forward
from jaxrl_llm.models.hf import config_from_hf, config_to_hf, load_hf, save_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 101

# name -> (transformers config class name, config kwargs)
CASES = {
    "llama_gqa": ("LlamaConfig", {
        "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 96, "rope_theta": 10000.0, "tie_word_embeddings": False}),
    "llama_mqa_llama3_tied": ("LlamaConfig", {
        "hidden_size": 48, "num_attention_heads": 3, "num_key_value_heads": 1,
        "intermediate_size": 80, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "max_position_embeddings": 128,
        # A short original context puts the head's frequencies in all three
        # bands (kept, interpolated, divided by factor).
        "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "qwen2_bias": ("Qwen2Config", {
        "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 96, "rope_theta": 1000000.0, "tie_word_embeddings": False}),
    "qwen3_qknorm_head_dim": ("Qwen3Config", {
        "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
        "intermediate_size": 64, "rope_theta": 1000000.0, "tie_word_embeddings": True}),
}
GENERATION_CASES = ("llama_gqa", "qwen2_bias", "qwen3_qknorm_head_dim")


def _hf_model(case: str, seed: int = 0):
  """A random float32 `transformers` model; every weight (norms and biases too) random."""
  cls_name, kwargs = CASES[case]
  return testing.random_hf_model(cls_name, VOCAB, seed, **kwargs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """case -> (HF model, directory it was saved to with save_pretrained)."""
  out = {}
  for case in CASES:
    model = _hf_model(case)
    path = tmp_path_factory.mktemp(case)
    model.save_pretrained(path, safe_serialization=True)
    out[case] = (model, path)
  return out


def _padded_batch(seed: int = 0):
  """Tokens [3, 12] left-padded to real lengths 12, 7 and 3; mask 1 on real tokens."""
  rng = np.random.RandomState(seed)
  T = 12
  lengths = (12, 7, 3)
  tokens = rng.randint(1, VOCAB, (len(lengths), T))
  mask = np.zeros_like(tokens)
  for i, n in enumerate(lengths):
    mask[i, T - n:] = 1
  return np.where(mask == 1, tokens, 0), mask


def _hf_logits(model, tokens, mask) -> np.ndarray:
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions))
  return out.logits.numpy()


def _our_logits(cfg, params, tokens, mask) -> np.ndarray:
  return np.asarray(forward(cfg, params, jnp.asarray(tokens),
                            segment_ids_BT=jnp.asarray(mask, jnp.int32)))


def _assert_close(ours, ref, mask, rtol=1e-4):
  real = mask.astype(bool)
  err = np.max(np.abs(ours[real] - ref[real]))
  scale = np.max(np.abs(ref[real]))
  assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol} * max |ref| {scale:.3g}"


# ---------------------------------------------------------------------------
# Parity with transformers.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_load_and_save_match_transformers(case, checkpoints, tmp_path):
  model, path = checkpoints[case]
  cfg, params = load_hf(path)
  hf_config = model.config
  assert cfg.family == hf_config.model_type
  assert cfg.num_kv_heads == hf_config.num_key_value_heads
  assert cfg.tie_embeddings == hf_config.tie_word_embeddings
  assert ("lm_head" in params) == (not cfg.tie_embeddings)
  tokens, mask = _padded_batch()
  ref = _hf_logits(model, tokens, mask)
  _assert_close(_our_logits(cfg, params, tokens, mask), ref, mask)

  # save_hf -> transformers gives the same model back.
  out = save_hf(cfg, params, tmp_path / "ours")
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
  if cfg.tie_embeddings:
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation="eager", dtype=torch.float32).eval()
  _assert_close(_hf_logits(reloaded, tokens, mask), ref, mask, rtol=1e-6)

  # ... and so does our own round trip.
  cfg2, params2 = load_hf(out)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_llama3_rope_scaling_is_read(checkpoints):
  cfg, _ = load_hf(checkpoints["llama_mqa_llama3_tied"][1])
  assert cfg.rope_scaling == RopeScaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=16)
  assert cfg.rope_theta == 500000.0
  assert cfg.num_kv_heads == 1


def test_qwen3_explicit_head_dim(checkpoints):
  cfg, params = load_hf(checkpoints["qwen3_qknorm_head_dim"][1])
  assert cfg.resolved_head_dim == 24 != cfg.hidden_size // cfg.num_heads
  assert cfg.qk_norm and not cfg.qkv_bias
  assert params["layers"]["q"].shape == (2, 32, 4, 24)
  assert params["layers"]["q_norm"].shape == (2, 24)


def test_qwen2_has_qkv_bias(checkpoints):
  cfg, params = load_hf(checkpoints["qwen2_bias"][1])
  assert cfg.qkv_bias and not cfg.qk_norm
  assert params["layers"]["k_bias"].shape == (2, 2, 16)


def test_rope_config_styles_agree(checkpoints, tmp_path):
  """Legacy rope_theta + rope_scaling and the rope_parameters dict read the same."""
  _, path = checkpoints["llama_mqa_llama3_tied"]
  saved = json.loads((path / "config.json").read_text())
  base = {k: v for k, v in saved.items()
          if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
  scaling = {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 16}
  legacy = dict(base, rope_theta=500000.0, rope_scaling=dict(scaling, type="llama3"))
  new = dict(base, rope_parameters=dict(scaling, rope_type="llama3", rope_theta=500000.0))
  assert config_from_hf(legacy) == config_from_hf(new) == load_hf(path)[0]

  # A legacy-style checkpoint directory loads to the same logits.
  legacy_dir = tmp_path / "legacy"
  shutil.copytree(path, legacy_dir)
  (legacy_dir / "config.json").write_text(json.dumps(legacy))
  tokens, mask = _padded_batch(1)
  a = _our_logits(*load_hf(legacy_dir), tokens, mask)
  b = _our_logits(*load_hf(path), tokens, mask)
  np.testing.assert_array_equal(a, b)

  plain = config_from_hf(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 7.0}))
  assert plain.rope_scaling is None and plain.rope_theta == 7.0
  assert config_from_hf(dict(base, rope_theta=7.0)).rope_theta == 7.0
  with pytest.raises(ValueError, match="disagree"):
    config_from_hf(dict(new, rope_theta=10000.0))


def test_sharded_checkpoints(checkpoints, tmp_path):
  model, path = checkpoints["qwen2_bias"]
  cfg, params = load_hf(path)
  # transformers' sharded layout.
  sharded = tmp_path / "hf_sharded"
  model.save_pretrained(sharded, max_shard_size="40KB")
  assert (sharded / "model.safetensors.index.json").is_file()
  assert len(list(sharded.glob("model-*.safetensors"))) > 1
  cfg_s, params_s = load_hf(sharded)
  assert cfg_s == cfg
  jax.tree.map(np.testing.assert_array_equal, params_s, params)

  # Ours, read back by transformers and by us.
  ours = save_hf(cfg, params, tmp_path / "ours_sharded", shard_size_bytes=30_000)
  index = json.loads((ours / "model.safetensors.index.json").read_text())
  shards = sorted(ours.glob("model-*.safetensors"))
  assert len(shards) > 1 and not (ours / "model.safetensors").exists()
  assert set(index["weight_map"].values()) == {s.name for s in shards}
  assert index["metadata"]["total_size"] == sum(
      v.nbytes for s in shards for v in load_file(s).values())
  tokens, mask = _padded_batch(2)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      ours, attn_implementation="eager", dtype=torch.float32).eval()
  _assert_close(_hf_logits(reloaded, tokens, mask), _hf_logits(model, tokens, mask), mask,
                rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, load_hf(ours)[1], params)


def test_dtypes_and_shardings(checkpoints, tmp_path):
  _, path = checkpoints["llama_gqa"]
  cfg, params = load_hf(path, "bfloat16", param_dtype="float32")
  assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")
  assert params["embed"].dtype == jnp.float32
  out = save_hf(cfg, params, tmp_path / "bf16", dtype="bfloat16")
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  cfg16, params16 = load_hf(out, "bfloat16")
  assert cfg16.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
  np.testing.assert_array_equal(
      np.asarray(params16["layers"]["q"]),
      np.asarray(params["layers"]["q"].astype(jnp.bfloat16)))
  # bf16 files read back into float32 exactly.
  _, params32 = load_hf(out)
  np.testing.assert_array_equal(np.asarray(params32["layers"]["q"]),
                                np.asarray(params16["layers"]["q"], np.float32))

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  _, placed = load_hf(path, shardings=replicated)
  assert all(x.sharding == replicated for x in jax.tree.leaves(placed))


def test_config_round_trip():
  cfgs = [
      ModelConfig(vocab_size=100, hidden_size=64, num_layers=3, num_heads=8, num_kv_heads=2,
                  intermediate_size=128, family="llama", rope_theta=500000.0,
                  rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=8192),
                  tie_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5),
      ModelConfig(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                  intermediate_size=128, family="qwen2", qkv_bias=True, rope_theta=1e6),
      ModelConfig(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1,
                  intermediate_size=128, family="qwen3", qk_norm=True, head_dim=48),
  ]
  for cfg in cfgs:
    hf = config_to_hf(cfg)
    assert config_from_hf(hf) == cfg
    # transformers accepts what we write, with the same geometry.
    loaded = transformers.AutoConfig.for_model(**hf)
    assert loaded.architectures == hf["architectures"]
    assert loaded.rope_parameters["rope_theta"] == cfg.rope_theta
    assert config_from_hf(loaded.to_dict()) == cfg
  assert config_from_hf(config_to_hf(cfgs[0]), dtype="bfloat16").dtype == "bfloat16"
  with pytest.raises(ValueError, match="Unknown ModelConfig override"):
    config_from_hf(config_to_hf(cfgs[0]), dtypes="bfloat16")
  with pytest.raises(ValueError, match="qkv_bias"):
    config_to_hf(cfgs[1].replace(qkv_bias=False))
  with pytest.raises(ValueError, match="qk_norm"):
    config_to_hf(cfgs[0].replace(qk_norm=True))


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------
def _base_llama() -> dict:
  return config_to_hf(ModelConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2,
                                  num_kv_heads=1, intermediate_size=16))


@pytest.mark.parametrize("changes,match", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
     r"MistralForCausalLM.*LlamaForCausalLM"),
    ({"architectures": None, "model_type": "gemma"}, r"model_type='gemma'.*llama"),
    ({"model_type": "qwen2"}, r"model_type='llama'.*model_type='qwen2'"),
    ({"attention_bias": True}, r"attention_bias=True"),
    ({"mlp_bias": True}, r"mlp_bias=True"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'.*silu"),
    ({"use_sliding_window": True}, r"use_sliding_window=True"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
     r"'yarn'.*\('default', 'llama3'\)"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"'linear'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, r"missing.*low_freq_factor"),
    ({"vocab_size": None}, r"'vocab_size'"),
])
def test_config_errors(changes, match):
  with pytest.raises(ValueError, match=match):
    config_from_hf(dict(_base_llama(), **changes))


def _copy_with_tensors(src, dst, edit):
  """Copies a single-file checkpoint, editing its tensor dict with `edit`."""
  shutil.copytree(src, dst)
  tensors = load_file(dst / "model.safetensors")
  edit(tensors)
  save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  return dst


def test_missing_and_misshapen_tensors(checkpoints, tmp_path):
  _, path = checkpoints["llama_gqa"]
  name = "model.layers.1.self_attn.k_proj.weight"
  missing = _copy_with_tensors(path, tmp_path / "missing", lambda t: t.pop(name))
  with pytest.raises(ValueError, match=rf"missing 1 tensor.*{name} \(expected shape \(32, 64\)\)"):
    load_hf(missing)

  def reshape(t):
    t[name] = np.zeros((16, 64), np.float32)
  wrong = _copy_with_tensors(path, tmp_path / "wrong", reshape)
  with pytest.raises(ValueError, match=rf"{name}: expected shape \(32, 64\), found \(16, 64\)"):
    load_hf(wrong)

  extra_name = "model.layers.0.self_attn.o_proj.bias"

  def add(t):
    t[extra_name] = np.zeros((64,), np.float32)
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones((8,), np.float32)
  extra = _copy_with_tensors(path, tmp_path / "extra", add)
  with pytest.raises(ValueError, match=rf"does not use: \['{extra_name}'\]"):
    load_hf(extra)
  with pytest.warns(UserWarning, match=extra_name):
    _, params = load_hf(extra, strict=False)
  jax.tree.map(np.testing.assert_array_equal, params, load_hf(path)[1])


def test_missing_files(checkpoints, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_hf(tmp_path / "nowhere")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=r"config\.json"):
    load_hf(empty)
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  shutil.copy(checkpoints["llama_gqa"][1] / "config.json", no_weights)
  with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
    load_hf(no_weights)

  # A shard named by the index but absent.
  model, _ = checkpoints["llama_gqa"]
  sharded = tmp_path / "sharded"
  model.save_pretrained(sharded, max_shard_size="40KB")
  victim = max(sharded.glob("model-*.safetensors"))
  victim.unlink()
  with pytest.raises(FileNotFoundError, match=victim.name):
    load_hf(sharded)

  bad_arch = tmp_path / "bad_arch"
  shutil.copytree(checkpoints["llama_gqa"][1], bad_arch)
  config = json.loads((bad_arch / "config.json").read_text())
  config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
  (bad_arch / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="GPT2LMHeadModel"):
    load_hf(bad_arch)


def test_save_is_atomic_and_protects_existing_dirs(checkpoints, tmp_path):
  cfg, params = load_hf(checkpoints["qwen3_qknorm_head_dim"][1])
  target = tmp_path / "ckpt"
  save_hf(cfg, params, target)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_hf(cfg, params, target)
  save_hf(cfg, params, target, overwrite=True, extra_config={"eos_token_id": 7})
  assert json.loads((target / "generation_config.json").read_text()) == {"eos_token_id": 7}
  (tmp_path / "empty").mkdir()
  save_hf(cfg, params, tmp_path / "empty")

  # A failing save (bad params) leaves neither the target nor temporary files.
  broken = dict(params, layers=dict(params["layers"], q=params["layers"]["q"][:, :, :2]))
  with pytest.raises(ValueError, match=r"params\['layers/q'\] has shape"):
    save_hf(cfg, broken, tmp_path / "broken")
  with pytest.raises(ValueError, match="does not have"):
    save_hf(cfg, dict(params, lm_head=params["embed"].T), tmp_path / "broken")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "empty"]


# ---------------------------------------------------------------------------
# Greedy generation parity.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", GENERATION_CASES)
def test_greedy_generation_matches_transformers(case, checkpoints):
  sampling = pytest.importorskip("jaxrl_llm.sampling")
  model, path = checkpoints[case]
  cfg, params = load_hf(path)
  P, new = 9, 32
  rng = np.random.RandomState(3)
  tokens = rng.randint(1, VOCAB, (2, P))
  mask = np.ones_like(tokens)
  mask[1, :4] = 0  # second prompt: 5 real tokens, left-padded
  tokens = np.where(mask == 1, tokens, 0)
  with torch.no_grad():
    hf_out = model.generate(
        input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), do_sample=False,
        max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0)
  hf_new = hf_out[:, P:].numpy()
  assert hf_new.shape == (2, new)
  out = sampling.sample(cfg, params, jnp.asarray(tokens), jnp.asarray(mask),
                        jax.random.key(0), max_new_tokens=new, greedy=True)
  np.testing.assert_array_equal(np.asarray(out.tokens_BL), hf_new)
  np.testing.assert_array_equal(np.asarray(out.lengths_B), [new, new])
