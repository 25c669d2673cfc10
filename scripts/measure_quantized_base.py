"""Log-prob agreement of a quantized frozen base with its float weights, on a trained model.

Reads the full-parameter checkpoint of a built-in model (e.g. the SFT warm-start of
configs/grpo_lora_arithmetic.py: <workdir>/sft_warmstart), quantizes its projection
weights with each `model.lora.quantize_base` kind (`jaxrl_llm.quantize`) and compares,
on held-out arithmetic problems (prompt + answer, as SFT sees them), the per-token
log-probs of the quantized model with the float one: mean and max |Δ log p| over the
answer tokens and over all tokens, and the answer NLL of each. CPU is enough.

  python scripts/measure_quantized_base.py --checkpoint=/tmp/run/sft_warmstart --builtin=tiny
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from jaxrl_llm import config as config_lib
from jaxrl_llm import lora, quantize, tokenizers
from jaxrl_llm.checkpoint import Checkpointer
from jaxrl_llm.data import pipeline, tasks
from jaxrl_llm.models import decoder


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", required=True, help="a run workdir with full-param checkpoints")
  ap.add_argument("--builtin", default="tiny", help="the built-in model it holds")
  ap.add_argument("--examples", type=int, default=256)
  ap.add_argument("--block_size", type=int, default=64)
  ap.add_argument("--max_digits", type=int, default=2)
  args = ap.parse_args(argv)

  tok = tokenizers.load_tokenizer("builtin")
  cfg = config_lib.builtin_model_config(config_lib.ModelSpec(builtin=args.builtin),
                                        tok.vocab_size)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                           ("data", "fsdp", "tensor"))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                          decoder.param_shapes(cfg))
  params = jax.device_get(Checkpointer(args.checkpoint, create=False).restore_params(abstract))

  # The task as configs/grpo_lora_arithmetic.py trains it (`config.use_builtin_task`).
  data = pipeline.DataConfig(source="arithmetic", seq_len=64, max_prompt_len=12,
                             max_answer_len=6, task_options=(("max_digits", args.max_digits),))
  examples = tasks.generate("arithmetic", "test", args.examples, 0, max_digits=args.max_digits)
  batch = pipeline.make_batch(examples, data, "sft", tokenizer=tok)
  tokens, seg, mask = batch["tokens"], batch["segment_ids"], batch["loss_mask"]

  def logps(model_cfg, p):
    @jax.jit
    def f(p):
      h = decoder.hidden_states(model_cfg, p, tokens[:, :-1], segment_ids_BT=seg[:, :-1])
      return decoder.token_logprobs(model_cfg, p, h, tokens[:, 1:])
    return np.asarray(f(p))

  answer = (mask[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1])
  real = (seg[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1])
  ref = logps(cfg, params)
  print(f"model: built-in {args.builtin!r} from {args.checkpoint}, {int(answer.sum())} answer "
        f"tokens / {int(real.sum())} tokens of {args.examples} held-out problems; "
        f"float answer NLL {-ref[answer].mean():.4f}")
  print("| kind | mean |Δ log p| answer | max answer | mean all | max all | answer NLL |")
  print("|---|---|---|---|---|---|---|")
  for kind in ("int8", "int4", "nf4"):
    lcfg = lora.LoraConfig(rank=1, quantize_base=kind, adapter_only_checkpoints=True,
                           quantize_block_size=args.block_size)
    q = quantize.quantize_params(lcfg, params)  # the base alone: no adapters
    got = logps(cfg.replace(lora=lcfg), q)
    d = np.abs(got - ref)
    print(f"| {kind} | {d[answer].mean():.4f} | {d[answer].max():.4f} | {d[real].mean():.4f} "
          f"| {d[real].max():.4f} | {-got[answer].mean():.4f} |")


if __name__ == "__main__":
  main()
