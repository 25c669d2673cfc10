"""LoRA adapters in the Hugging Face PEFT layout: logits equal `peft` (CPU torch,
float32) for an adapter we export and for one `peft` writes that we import; merged
export through `save_hf` equals the unmerged model in `transformers`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxrl_llm import lora, testing
from jaxrl_llm.models import forward, load_hf, save_hf
from jaxrl_llm.models import peft as peft_io

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 101
CASES = {
    "llama": ("LlamaConfig", {"hidden_size": 64, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "intermediate_size": 96,
                              "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", {"hidden_size": 64, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "intermediate_size": 96,
                              "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"hidden_size": 32, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "head_dim": 24,
                              "intermediate_size": 64, "tie_word_embeddings": True}),
}
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_model(case, seed=0):
  cls_name, kwargs = CASES[case]
  return testing.random_hf_model(cls_name, VOCAB, seed, rope_theta=10000.0, **kwargs)


def _base_dir(case, tmp_path):
  model = _hf_model(case)
  path = tmp_path / f"{case}_base"
  model.save_pretrained(path, safe_serialization=True)
  return path


def _load_base_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager", dtype=torch.float32).eval()


TOKENS = np.random.RandomState(0).randint(1, VOCAB, (2, 10))


def _hf_logits(model):
  with torch.no_grad():
    return model(input_ids=torch.tensor(TOKENS)).logits.numpy()


def _our_logits(cfg, params):
  return np.asarray(forward(cfg, params, jnp.asarray(TOKENS)))


def _assert_close(ours, ref, rtol=1e-4):
  err = np.max(np.abs(ours - ref))
  assert err <= rtol * np.max(np.abs(ref)), err


def _trained(params, seed=1):
  """Adapters as after training: random A and B (B no longer 0)."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  layers = {k: (0.1 * jax.random.normal(next(keys), v.shape, v.dtype)
                if k.endswith((lora.A_SUFFIX, lora.B_SUFFIX)) else v)
            for k, v in params["layers"].items()}
  return dict(params, layers=layers)


@pytest.mark.parametrize("case", list(CASES))
def test_exported_adapter_gives_our_logits_in_peft(case, tmp_path):
  base_dir = _base_dir(case, tmp_path)
  cfg, base = load_hf(base_dir)
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, target_modules=("q", "v", "o", "down"))
  cfg = cfg.replace(lora=lcfg)
  params = _trained(lora.add_adapters(lcfg, base, jax.random.key(0)))
  ours = _our_logits(cfg, params)
  out = peft_io.save_peft(cfg, params, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
  written = load_file(out / peft_io.ADAPTER_WEIGHTS_NAME)
  a = written["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"]
  b = written["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"]
  assert a.shape == (4, cfg.num_heads * cfg.resolved_head_dim) and b.shape == (cfg.hidden_size, 4)
  assert len(written) == 2 * 4 * cfg.num_layers
  model = peft.PeftModel.from_pretrained(_load_base_model(base_dir), out).eval()
  ref = _hf_logits(model)
  assert not np.allclose(ref, _hf_logits(_load_base_model(base_dir)), atol=1e-3)
  _assert_close(ours, ref)
  # ... and our import of our export is the identity.
  cfg2, params2 = load_hf(base_dir, lora_adapter=out)
  assert cfg2.lora == lcfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("case, rslora", [("llama", False), ("qwen3", True)])
def test_imported_peft_adapter_gives_peft_logits(case, rslora, tmp_path):
  base_dir = _base_dir(case, tmp_path)
  config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=HF_TARGETS, lora_dropout=0.0,
                           init_lora_weights=False, use_rslora=rslora, task_type="CAUSAL_LM")
  torch.manual_seed(3)
  model = peft.get_peft_model(_load_base_model(base_dir), config).eval()
  model.save_pretrained(tmp_path / "adapter")
  ref = _hf_logits(model)
  assert not np.allclose(ref, _hf_logits(_load_base_model(base_dir)), atol=1e-3)
  cfg, params = load_hf(base_dir, lora_adapter=tmp_path / "adapter")
  assert cfg.lora.rank == 4 and cfg.lora.target_modules == lora.TARGETS
  assert cfg.lora.scale == pytest.approx(16 / 2 if rslora else 16 / 4)
  assert set(lora.trainable_params(params)["layers"]) == {
      f"{t}{s}" for t in lora.TARGETS for s in (lora.A_SUFFIX, lora.B_SUFFIX)}
  _assert_close(_our_logits(cfg, params), ref)


def test_pissa_exports_as_a_rank_2r_adapter_of_the_original_weights(tmp_path):
  base_dir = _base_dir("qwen2", tmp_path)
  cfg, base = load_hf(base_dir)
  lcfg = lora.LoraConfig(rank=4, alpha=4.0, init="pissa", target_modules=("q", "up"))
  cfg = cfg.replace(lora=lcfg)
  params = _trained(lora.add_adapters(lcfg, base, jax.random.key(0)))
  # The starting model (residual + A₀B₀) is the original base: save it merged.
  start_dir = save_hf(cfg, lora.reference_params(params), tmp_path / "start")
  adapter = peft_io.save_peft(cfg, params, tmp_path / "adapter")
  conf = json.loads((adapter / peft_io.ADAPTER_CONFIG_NAME).read_text())
  assert conf["r"] == 8 and conf["lora_alpha"] == 8.0
  model = peft.PeftModel.from_pretrained(_load_base_model(start_dir), adapter).eval()
  _assert_close(_our_logits(cfg, params), _hf_logits(model))
  _assert_close(_hf_logits(_load_base_model(start_dir)), _hf_logits(_load_base_model(base_dir)))


def test_merged_export_through_save_hf(tmp_path):
  base_dir = _base_dir("llama", tmp_path)
  cfg, base = load_hf(base_dir)
  lcfg = lora.LoraConfig(rank=4, alpha=8.0)
  cfg = cfg.replace(lora=lcfg)
  params = _trained(lora.add_adapters(lcfg, base, jax.random.key(0)))
  out = save_hf(cfg, params, tmp_path / "merged")
  assert not any("lora" in k for k in load_file(out / "model.safetensors"))
  _assert_close(_hf_logits(_load_base_model(out)), _our_logits(cfg, params))
  with pytest.raises(ValueError, match="cfg.lora is None"):
    save_hf(cfg.replace(lora=None), params, tmp_path / "bad")


def test_unsupported_peft_configs_are_refused(tmp_path):
  base_dir = _base_dir("llama", tmp_path)
  config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True,
                           task_type="CAUSAL_LM")
  peft.get_peft_model(_load_base_model(base_dir), config).save_pretrained(tmp_path / "dora")
  with pytest.raises(ValueError, match="use_dora"):
    load_hf(base_dir, lora_adapter=tmp_path / "dora")
  with pytest.raises(FileNotFoundError, match="not a PEFT adapter"):
    load_hf(base_dir, lora_adapter=tmp_path)
