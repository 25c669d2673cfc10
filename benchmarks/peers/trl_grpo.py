"""W1 and W5 on TRL: `GRPOTrainer` with transformers generation, matched to
w1_grpo_step.py (default) and w5_ragged_grpo_step.py (`--ragged`).

W1, same work per optimizer step: 64 prompts of 256 random tokens × 8
generations = 512 completions of exactly 512 tokens (`min_new_tokens` = 512
suppresses EOS), temperature 1, reward = fraction of even token ids,
reference model with β = 0.04 (k3 KL in the loss), one optimizer step per
generation batch (per_device_train_batch_size 32 × gradient_accumulation 16
= 512 completions, steps_per_generation 16, num_iterations 1), loss_type
"grpo" (sequence mean of token means, as the jaxrl_llm "grpo" preset).
TRL's own defaults otherwise (gradient checkpointing on, bf16 autocast,
AdamW, lr 1e-6).

W5 (`--ragged`, `--budget` 1024): the same, with max_completion_length =
the budget and completion i forced to W5's length n_i (benchmarks/peers/
ragged.py: i = prompt · 8 + sample, prompt-major). A `LogitsProcessor`
excludes EOS (id 2) at steps t < n_i − 1 and leaves only EOS at t = n_i − 1;
rows with n_i > budget run to the budget. How it reaches TRL: TRL 1.16 builds
`GenerationConfig(**generation_kwargs)`, and transformers rejects
`logits_processor` there ("not a valid argument of GenerationConfig; pass it
to generate()"), so the policy model's `generate` is wrapped to pass
`logits_processor=[processor]`, the argument transformers documents for
this. Assumptions, each checked on every step: TRL generates the whole
generation batch (512 rows) in one `generate` call (the regular
transformers path: no vLLM, no paged generation), batch row b is completion
b (prompt b // 8 — the reward function checks each row's prompt text against
the dataset order: TRL's `RepeatSampler` with shuffle_dataset False), and
the completions TRL scores are exactly min(n_i, budget) tokens, the finished
ones ending in EOS (asserted in the reward function, which sees every row's
completion_ids). Step t = current width − prompt width: generate appends one
column per step to the left-padded prompts, the same for every row.

Timing: wall time between consecutive optimizer-step ends (CUDA synchronised
by a callback); the first step (CUDA and cuBLAS warm-up) is dropped; median
of the rest. Under --ragged also the rollout: the wrapped `generate` call,
CUDA synchronised on both sides, first call dropped likewise.

  python -m benchmarks.peers.trl_grpo [--smoke] [--steps 3] [--dtype bfloat16]
  python -m benchmarks.peers.trl_grpo --ragged [--budget 1024] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from benchmarks import record
from benchmarks.peers import trl_common


def even_token_reward(prompts, completions, completion_ids, **kwargs):
  return [float(np.mean([t % 2 == 0 for t in ids])) if len(ids) else 0.0
          for ids in completion_ids]


def force_lengths_processor(lengths_B: np.ndarray, eos_id: int):
  """A transformers `LogitsProcessor`: batch row b emits `eos_id` at step
  lengths_B[b] − 1 (0-based) and never before; `begin(prompt_width)` marks
  the start of each `generate` call."""
  import torch
  from transformers import LogitsProcessor

  class ForceLengths(LogitsProcessor):
    def __init__(self):
      self.last_B = torch.as_tensor(np.maximum(lengths_B, 1) - 1, dtype=torch.long)
      self.start = None
      self.steps = 0

    def begin(self, prompt_width: int):
      self.start = prompt_width

    def __call__(self, input_ids, scores):
      if self.start is None:
        raise RuntimeError("ForceLengths: begin(prompt_width) was not called for this generate")
      if scores.shape[0] != self.last_B.shape[0]:
        raise ValueError(f"ForceLengths: generate batch of {scores.shape[0]} rows, "
                         f"{self.last_B.shape[0]} forced lengths; the generation batch must "
                         "be the whole 64 x 8 batch in one call")
      t = input_ids.shape[1] - self.start
      last_B = self.last_B.to(scores.device)
      stop_B, early_B = last_B == t, last_B > t
      eos_B = scores[:, eos_id]
      eos_B = torch.where(stop_B, torch.zeros_like(eos_B),
                          torch.where(early_B, torch.full_like(eos_B, -float("inf")), eos_B))
      out = scores.masked_fill(stop_B[:, None], -float("inf"))
      out[:, eos_id] = eos_B
      self.steps += 1
      return out

  return ForceLengths()


def install_forced_generate(model, processor, times: list):
  """Wraps `model.generate`: passes `logits_processor=[processor]`, starts the
  processor's step count at the prompt width, records the call's wall time."""
  import torch
  from transformers import LogitsProcessorList

  inner = model.generate
  sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

  def generate(*args, **kwargs):
    if "logits_processor" in kwargs:
      raise RuntimeError("generate already got a logits_processor; the W5 wrapper would drop it")
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    processor.begin(input_ids.shape[1])
    sync()
    t0 = time.perf_counter()
    out = inner(*args, logits_processor=LogitsProcessorList([processor]), **kwargs)
    sync()
    times.append(time.perf_counter() - t0)
    return out

  model.generate = generate


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--out", default="")
  p.add_argument("--tag", default="")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--dtype", default="bfloat16", help="model weight dtype (bfloat16|float32)")
  p.add_argument("--micro", type=int, default=32, help="per_device_train_batch_size")
  p.add_argument("--ragged", action="store_true",
                 help="W5: completion i forced to W5's log-normal length n_i")
  p.add_argument("--budget", type=int, default=None,
                 help="W5 new-token budget (default 1024; 32 under --smoke, as W5)")
  args = p.parse_args()

  if args.ragged:  # W5's lengths come through jaxrl_llm; keep its JAX off the GPU
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from benchmarks.peers import ragged
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
  if args.ragged:
    L = ragged.budget(args.budget, args.smoke)
    forced = ragged.forced_lengths(B, L, args.smoke)
    want = np.minimum(forced, L)
    stats = ragged.length_stats(forced, L)
  vocab = trl_common.SIZES[size]["vocab_size"]
  tok = trl_common.make_tokenizer(vocab)
  model = trl_common.save_model(size, args.dtype, os.path.join("/tmp", f"trl_{size}_{args.dtype}"))
  rng = np.random.default_rng(0)
  texts = [trl_common.random_text(rng, P, vocab) for _ in range(R * (args.steps + 1))]
  assert len(tok(texts[0])["input_ids"]) == P
  ds = Dataset.from_dict({"prompt": texts})

  checked = []  # W5: per generation batch, its rows' completion lengths (checked)

  def ragged_reward(prompts, completions, completion_ids, **kwargs):
    k = len(checked)
    if len(completion_ids) != B:
      raise AssertionError(f"reward got {len(completion_ids)} rows, expected the batch of {B}")
    order = [texts[k * R + i // G] for i in range(B)]
    if list(prompts) != order:
      raise AssertionError("generation rows are not prompt-major (row i = prompt i // G)")
    got = np.array([len(ids) for ids in completion_ids])
    ragged.check_lengths(got, want, f"TRL generation batch {k}")
    if not all(ids[-1] == ragged.EOS_ID for ids, n in zip(completion_ids, forced) if n <= L):
      raise AssertionError("a finished row does not end in EOS")
    checked.append(got)
    return even_token_reward(prompts, completions, completion_ids)

  gen_kwargs = None if args.ragged else {"min_new_tokens": L}
  cfg = GRPOConfig(
      output_dir=os.path.join("/tmp", "trl_grpo_bench"), per_device_train_batch_size=micro,
      gradient_accumulation_steps=B // micro, num_generations=G, max_completion_length=L,
      generation_kwargs=gen_kwargs, temperature=1.0, top_p=1.0, top_k=0,
      beta=0.04, num_iterations=1, loss_type="grpo", learning_rate=1e-6, max_steps=args.steps,
      logging_steps=1, save_strategy="no", report_to="none", shuffle_dataset=False,
      bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(), seed=0,
      dataloader_num_workers=0, disable_tqdm=True,
      model_init_kwargs={"dtype": args.dtype, "attn_implementation": "sdpa"})
  timer = trl_common.step_timer_callback()
  trainer = GRPOTrainer(model=model,
                        reward_funcs=ragged_reward if args.ragged else even_token_reward,
                        args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
  gen_times = []
  if args.ragged:
    if trainer.eos_token_ids != [ragged.EOS_ID]:
      raise AssertionError(f"TRL stops on {trainer.eos_token_ids}, W5 forces EOS {ragged.EOS_ID}")
    if cfg.use_vllm or getattr(trainer, "use_transformers_continuous_batching", False):
      raise AssertionError("--ragged needs TRL's plain transformers generate path")
    processor = force_lengths_processor(forced, ragged.EOS_ID)
    install_forced_generate(trainer.model, processor, gen_times)
  trainer.train()
  times = timer.step_times()
  timed = times[1:] if len(times) > 1 else times
  hist = trainer.state.log_history
  lengths = [h.get("completions/mean_length") for h in hist if "completions/mean_length" in h]
  med = statistics.median(timed)
  res = {"step": record.summarize(timed), "all_steps_s": times, "sequences_per_s": B / med,
         "mean_completion_length": lengths, "log_history": hist, **trl_common.torch_info()}
  config = {"size": size, "prompts": R, "group_size": G, "prompt_len": P, "new_tokens": L,
            "weights_dtype": args.dtype, "bf16_autocast": cfg.bf16,
            "per_device_train_batch_size": micro, "gradient_accumulation_steps": B // micro,
            "gradient_checkpointing": cfg.gradient_checkpointing, "beta": 0.04,
            "loss_type": "grpo", "attn_implementation": "sdpa"}
  if args.ragged:
    if len(checked) != len(times) or len(gen_times) != len(times) or processor.steps == 0:
      raise AssertionError(f"{len(times)} steps, {len(gen_times)} generate calls, "
                           f"{len(checked)} checked batches, {processor.steps} processor calls")
    useful = stats["useful_tokens"]
    gen_timed = gen_times[1:] if len(gen_times) > 1 else gen_times
    res.update({"useful_tokens": useful, "lengths": stats, "lengths_checked_steps": len(checked),
                "useful_tokens_per_s": useful / med, "rollout": record.summarize(gen_timed),
                "all_rollouts_s": gen_times,
                "rollout_useful_tokens_per_s": useful / statistics.median(gen_timed),
                "processor_calls": processor.steps})
    config.update({"budget": L, "eos_id": ragged.EOS_ID,
                   "lengths": ragged.describe(L, args.smoke),
                   "generation": "transformers generate, LogitsProcessor forcing EOS at n_i"})
    name, title = "peer_trl_grpo_w5", f"TRL GRPO W5 {size}, {R}x{G} seqs, prompt {P}, budget {L}"
  else:
    res["completion_tokens_per_s"] = B * L / med
    config["generation"] = "transformers generate, min_new_tokens = max_new_tokens"
    name, title = "peer_trl_grpo", f"TRL GRPO {size}, {R}x{G} seqs, prompt {P}, {L} new"
  record.write_json(args, name, {"config": config, "results": res})
  if args.ragged:
    record.print_table(title, ["system", "step s", "rollout s", "useful tok/s", "mean len",
                               "peak GiB"],
                       [["trl", med, res["rollout"]["median_s"], res["useful_tokens_per_s"],
                         lengths[-1] if lengths else None, res.get("peak_gib")]])
  else:
    record.print_table(title, ["system", "step s", "seq/s", "mean len", "peak GiB"],
                       [["trl", med, B / med, lengths[-1] if lengths else None,
                         res.get("peak_gib")]])


if __name__ == "__main__":
  main()
