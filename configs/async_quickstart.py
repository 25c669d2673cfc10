"""Asynchronous actor–learner GRPO on the built-in arithmetic task (docs/async.md).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  python launch/train.py --config=configs/async_quickstart.py --workdir=/tmp/async_quickstart

No downloads. The quickstart recipe (an SFT warm-start of the built-in tiny
model on 1-2 digit addition/subtraction, then GRPO) with the devices split in
two: the actor samples and scores on `trainer.actor_devices` = 4 of the 8,
the learner computes advantages and updates on the other 4, and the actor's
parameters are `rl.async_lag` = 1 update old (a fixed, timing-independent lag:
two runs with the same seed log the same metrics). The lagged tokens are
corrected with truncated importance weights against the sampler
(`rl.off_policy.correction="tis"`, C = 2); staleness ("async/staleness"),
the IS weights and the clipped fraction are logged each step.

Config arguments: `lag=K` (0 equals the synchronous one-jit step),
`actor=A` (actor devices), `correction=tis|mis|vtrace|remix|none`,
`sft_steps=N`, `rl_steps=N`. Multi-GPU throughput is not measured in this
repository (no multi-GPU machine); on 8 CPU devices the two groups share
the same cores, so the split shows correctness and reward curves
(docs/async.md), not speed.
"""

from jaxrl_llm.config import arithmetic_rl_recipe, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, sft_steps=150, rl_steps=150, lag=1, actor=4, correction="tis")
  c = arithmetic_rl_recipe(rl_preset="grpo", sft_steps=args["sft_steps"],
                           rl_steps=args["rl_steps"], batch_size=16)
  c.eval.num_examples = 256
  c.rl.async_lag = args["lag"]
  c.rl.off_policy.correction = args["correction"]
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 5
  c.trainer.actor_devices = args["actor"]
  c.trainer.log_every = 1
  return c
