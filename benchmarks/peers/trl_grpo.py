"""W1 on TRL: `GRPOTrainer` with transformers generation, matched to w1_grpo_step.py.

Same work per optimizer step: 64 prompts of 256 random tokens × 8
generations = 512 completions of exactly 512 tokens (`min_new_tokens` = 512
suppresses EOS), temperature 1, reward = fraction of even token ids,
reference model with β = 0.04 (k3 KL in the loss), one optimizer step per
generation batch (per_device_train_batch_size 32 × gradient_accumulation 16
= 512 completions, steps_per_generation 16, num_iterations 1), loss_type
"grpo" (sequence mean of token means, as the jaxrl_llm "grpo" preset).
TRL's own defaults otherwise (gradient checkpointing on, bf16 autocast,
AdamW, lr 1e-6).

Timing: wall time between consecutive optimizer-step ends (CUDA synchronised
by a callback); the first step (CUDA and cuBLAS warm-up) is dropped; median
of the rest.

  python -m benchmarks.peers.trl_grpo [--smoke] [--steps 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np

from benchmarks import record
from benchmarks.peers import trl_common


def even_token_reward(prompts, completions, completion_ids, **kwargs):
  return [float(np.mean([t % 2 == 0 for t in ids])) if len(ids) else 0.0
          for ids in completion_ids]


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--out", default="")
  p.add_argument("--tag", default="")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--dtype", default="bfloat16", help="model weight dtype (bfloat16|float32)")
  p.add_argument("--micro", type=int, default=32, help="per_device_train_batch_size")
  args = p.parse_args()

  import torch
  from datasets import Dataset
  from trl import GRPOConfig, GRPOTrainer

  if args.smoke:
    size, R, G, P, L = "smoke", 4, 4, 16, 8
    micro = 4
  else:
    size, R, G, P, L = "0.5b", 64, 8, 256, 512
    micro = args.micro
  B = R * G
  vocab = trl_common.SIZES[size]["vocab_size"]
  tok = trl_common.make_tokenizer(vocab)
  model = trl_common.save_model(size, args.dtype, os.path.join("/tmp", f"trl_{size}_{args.dtype}"))
  rng = np.random.default_rng(0)
  prompts = [trl_common.random_text(rng, P, vocab) for _ in range(R * (args.steps + 1))]
  assert len(tok(prompts[0])["input_ids"]) == P
  ds = Dataset.from_dict({"prompt": prompts})
  cfg = GRPOConfig(
      output_dir=os.path.join("/tmp", "trl_grpo_bench"), per_device_train_batch_size=micro,
      gradient_accumulation_steps=B // micro, num_generations=G, max_completion_length=L,
      generation_kwargs={"min_new_tokens": L}, temperature=1.0, top_p=1.0, top_k=0,
      beta=0.04, num_iterations=1, loss_type="grpo", learning_rate=1e-6, max_steps=args.steps,
      logging_steps=1, save_strategy="no", report_to="none", shuffle_dataset=False,
      bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(), seed=0,
      dataloader_num_workers=0, disable_tqdm=True,
      model_init_kwargs={"dtype": args.dtype, "attn_implementation": "sdpa"})
  timer = trl_common.step_timer_callback()
  trainer = GRPOTrainer(model=model, reward_funcs=even_token_reward, args=cfg, train_dataset=ds,
                        processing_class=tok, callbacks=[timer])
  trainer.train()
  times = timer.step_times()
  timed = times[1:] if len(times) > 1 else times
  hist = trainer.state.log_history
  lengths = [h.get("completions/mean_length") for h in hist if "completions/mean_length" in h]
  med = statistics.median(timed)
  res = {"step": record.summarize(timed), "all_steps_s": times, "sequences_per_s": B / med,
         "completion_tokens_per_s": B * L / med, "mean_completion_length": lengths,
         "log_history": hist, **trl_common.torch_info()}
  config = {"size": size, "prompts": R, "group_size": G, "prompt_len": P, "new_tokens": L,
            "weights_dtype": args.dtype, "bf16_autocast": cfg.bf16,
            "per_device_train_batch_size": micro, "gradient_accumulation_steps": B // micro,
            "gradient_checkpointing": cfg.gradient_checkpointing, "beta": 0.04,
            "loss_type": "grpo", "attn_implementation": "sdpa",
            "generation": "transformers generate, min_new_tokens = max_new_tokens"}
  record.write_json(args, "peer_trl_grpo", {"config": config, "results": res})
  record.print_table(f"TRL GRPO {size}, {R}x{G} seqs, prompt {P}, {L} new",
                     ["system", "step s", "seq/s", "mean len", "peak GiB"],
                     [["trl", med, B / med, lengths[-1] if lengths else None,
                       res.get("peak_gib")]])


if __name__ == "__main__":
  main()
