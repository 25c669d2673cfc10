"""Distillation: a larger built-in teacher, trained here, distilled into the tiny model.

  python launch/train.py --config=configs/distill_arithmetic.py --workdir=/tmp/gkd
  python launch/train.py --config=configs/distill_arithmetic.py:arm=grpo --workdir=/tmp/grpo
  python launch/train.py --config=configs/distill_arithmetic.py:teacher=/tmp/gkd/teacher \
      --workdir=/tmp/gkd_s1 --config.seed=1    # reuse a trained teacher

Task: 1-2 digit addition/subtraction (built-in tokenizer, no downloads).
The teacher is the built-in "small" model (3.2M params), trained by this
recipe itself: teacher_steps of SFT in <workdir>/teacher (reused when the run
resumes; `teacher=` names a finished teacher workdir instead). The student is
the built-in "tiny" model (0.8M params) after a short SFT warm-start
(sft_steps), so that it has room to improve. Then `steps` steps that each
sample 128 completions from the student:

  arm=gkd        (default) kind="distill", distill.mode="gkd" with lambda = 1:
                 128 prompts x 1 student sample at T = 1, trained on the
                 generalized JSD (beta 0.5) to the teacher at every token
  arm=on_policy  kind="distill", distill.mode="on_policy": 16 prompts x 8
                 samples, each token's advantage log pi_teacher - log pi_student
                 (the exact-match reward is logged, not used: outcome_coef=0)
  arm=grpo       kind="rl": GRPO on the exact-match reward, 16 prompts x 8

All arms: learning rate `lr` (1e-4), 100 steps, the same warm-start per seed.
Measured: docs/distill.md (scripts/measure_recipes.py --plan=distill).
"""

from jaxrl_llm.config import arithmetic_rl_recipe, parse_arg

ARMS = ("gkd", "on_policy", "grpo")


def get_config(arg=None):
  args = parse_arg(arg, arm="gkd", sft_steps=250, teacher_steps=400, steps=100, lr=1e-4,
                   teacher="")
  if args["arm"] not in ARMS:
    raise ValueError(f"arm={args['arm']!r}; choose one of {ARMS}")
  gkd = args["arm"] == "gkd"
  # 128 sampled completions per step in every arm: 128 prompts x 1 (gkd) or 16 x 8.
  c = arithmetic_rl_recipe(kind="rl" if args["arm"] == "grpo" else "distill",
                           rl_preset="grpo", sft_steps=args["sft_steps"],
                           rl_steps=args["steps"], batch_size=128 if gkd else 16)
  c.model.builtin = "tiny"
  c.optim.learning_rate = args["lr"]
  c.distill.mode = "gkd" if gkd else "on_policy"
  c.distill.lmbda = 1.0                  # gkd: every completion is the student's own sample
  c.distill.beta = 0.5
  c.distill.max_new_tokens = c.rl.max_new_tokens
  c.distill.coef = 1.0                   # on_policy: the teacher's dense advantage
  c.distill.outcome_coef = 0.0           # on_policy: distillation alone (1.0: GRPO + distillation)
  if args["teacher"]:                    # a finished teacher workdir, e.g. <earlier run>/teacher
    c.distill.teacher_source = "workdir"
    c.distill.teacher_path = args["teacher"]
  else:
    c.distill.teacher_source = "builtin"
    c.distill.teacher_builtin = "small"
    c.distill.teacher_sft_steps = args["teacher_steps"]
    c.distill.teacher_sft_learning_rate = 3e-3
    c.distill.teacher_sft_batch_size = 64
  c.eval.every_steps = 50
  c.checkpoint.save_interval_steps = 50
  c.trainer.log_every = 10
  return c
