"""W4 on TRL: `DPOTrainer`, matched to w4_dpo_step.py.

Same work per optimizer step: 32 pairs, each a 512-token random prompt with
a 512-token chosen and a 512-token rejected completion (511 random tokens +
EOS), max_length 1024; sigmoid DPO loss, β = 0.1; reference model computed
in the step (precompute_ref_log_probs False). 32 pairs per optimizer step =
per_device_train_batch_size × gradient_accumulation_steps (default 8 × 4: a
single micro-batch of 32 pairs needs the full [64, 1024, 151936] logits).
TRL's defaults otherwise (gradient checkpointing on, bf16 autocast, AdamW).

Timing as trl_grpo.py: wall time between optimizer-step ends, first step
dropped, median of the rest.

  python -m benchmarks.peers.trl_dpo [--smoke] [--steps 6] [--micro 8]
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np

from benchmarks import record
from benchmarks.peers import trl_common


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--out", default="")
  p.add_argument("--tag", default="")
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--dtype", default="bfloat16", help="model weight dtype (bfloat16|float32)")
  p.add_argument("--micro", type=int, default=8, help="pairs per micro-batch")
  args = p.parse_args()

  import torch
  from datasets import Dataset
  from trl import DPOConfig, DPOTrainer

  size, N, P, C = ("smoke", 4, 16, 16) if args.smoke else ("0.5b", 32, 512, 512)
  micro = min(args.micro, N)
  vocab = trl_common.SIZES[size]["vocab_size"]
  tok = trl_common.make_tokenizer(vocab)
  path = trl_common.save_model(size, args.dtype, os.path.join("/tmp", f"trl_{size}_{args.dtype}"))
  rng = np.random.default_rng(0)
  n = N * (args.steps + 1)
  rows = {"prompt": [trl_common.random_text(rng, P, vocab) for _ in range(n)],
          "chosen": [" " + trl_common.random_text(rng, C - 1, vocab) + " </s>" for _ in range(n)],
          "rejected": [" " + trl_common.random_text(rng, C - 1, vocab) + " </s>" for _ in range(n)]}
  ds = Dataset.from_dict(rows)
  cfg = DPOConfig(
      output_dir=os.path.join("/tmp", "trl_dpo_bench"), per_device_train_batch_size=micro,
      gradient_accumulation_steps=N // micro, max_length=P + C, beta=0.1,
      loss_type=["sigmoid"], precompute_ref_log_probs=False, learning_rate=1e-6,
      max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none",
      bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(), seed=0,
      dataloader_num_workers=0, disable_tqdm=True,
      model_init_kwargs={"dtype": args.dtype, "attn_implementation": "sdpa"})
  timer = trl_common.step_timer_callback()
  trainer = DPOTrainer(model=path, args=cfg, train_dataset=ds, processing_class=tok,
                       callbacks=[timer])
  ex = trainer.train_dataset[0]
  lens = {k: len(v) for k, v in ex.items() if k.endswith("ids")}
  print("tokenized lengths of the first example:", lens)
  trainer.train()
  times = timer.step_times()
  timed = times[1:] if len(times) > 1 else times
  med = statistics.median(timed)
  res = {"step": record.summarize(timed), "all_steps_s": times, "pairs_per_s": N / med,
         "tokenized_lengths": lens, "log_history": trainer.state.log_history,
         **trl_common.torch_info()}
  config = {"size": size, "pairs": N, "prompt_len": P, "completion_len": C,
            "weights_dtype": args.dtype, "bf16_autocast": cfg.bf16,
            "per_device_train_batch_size": micro, "gradient_accumulation_steps": N // micro,
            "gradient_checkpointing": cfg.gradient_checkpointing, "beta": 0.1,
            "loss_type": "sigmoid", "precompute_ref_log_probs": False,
            "attn_implementation": "sdpa"}
  record.write_json(args, "peer_trl_dpo", {"config": config, "results": res})
  record.print_table(f"TRL DPO {size}, {N} pairs x {P + C} tokens",
                     ["system", "step s", "pairs/s", "peak GiB"],
                     [["trl", med, N / med, res.get("peak_gib")]])


if __name__ == "__main__":
  main()
