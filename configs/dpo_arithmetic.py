"""Offline preference optimisation on the built-in synthetic preference task.

  python launch/train.py --config=configs/dpo_arithmetic.py --workdir=/tmp/dpo_arith

Pairs: the prompt is a 1-digit addition/subtraction, the chosen completion
follows the rule (the exact result) and the rejected one breaks it (off by 1-3
or digits shuffled). Stage 1 is a short SFT warm-start on the same problems;
stage 2 trains with RPO (DPO + η·NLL of the chosen answer), which raises the
held-out greedy rule-following rate; plain DPO (`--config=...:loss=dpo`) raises
the held-out implicit-reward accuracy but lowers the chosen likelihood on this
tiny model (a known DPO failure mode), so RPO is the default.
Hardware: 2 CPU cores, about 3 minutes. Measured (CPU, defaults, seeds 0/1/2,
mean ± std; README): held-out greedy rule-following 0.150 ± 0.023 after the SFT
stage -> 0.224 ± 0.112 after 60 RPO steps (gain +0.074 ± 0.102: not
distinguishable from noise), sampled (T=1) 0.159 ± 0.042 -> 0.207 ± 0.061 (gain
+0.048 ± 0.028 in every seed). The test suite's smaller recipe (tests/preference_step_test.py)
measured greedy gains of +0.24 to +0.37 over 3 seeds.
"""

from jaxrl_llm.config import default_configdict, parse_arg, use_builtin_task


def get_config(arg=None):
  args = parse_arg(arg, steps=60, sft_steps=60, loss="rpo")
  c = default_configdict(kind="dpo")
  use_builtin_task(c, "preference_arithmetic", max_digits=1, batch_size=32)
  c.preference.losses = ((args["loss"], 1.0),)
  c.preference.beta = 0.1
  if args["loss"] == "rpo":
    c.preference.eta = 1.0
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 10
  c.checkpoint.save_interval_steps = 50
  c.trainer.num_steps = args["steps"]
  c.trainer.log_every = 10
  c.trainer.sft_warmstart.num_steps = args["sft_steps"]
  return c
