"""Evaluate a checkpoint on the held-out split of a config.

  python launch/eval.py --config=configs/grpo_gsm8k.py --workdir=/tmp/grpo_gsm8k \
      [--config.eval.num_samples=16 --config.eval.repeats=3 --config.eval.float32=true]
  python launch/eval.py --config=configs/grpo_gsm8k.py --workdir=/tmp/eval_base \
      --hf_path=/models/Qwen2.5-0.5B-Instruct

The same config files and flags as launch/train.py. Params: `--hf_path` if
given, else the latest (or `--step`) checkpoint in `<workdir>/checkpoints`,
else `model.path` of an HF config. Prints greedy accuracy, mean@n, pass@k,
maj@k and lengths (`jaxrl_llm.eval`), and writes per-problem results to
`<workdir>/eval/`. A completion is correct by the rule the run is rewarded by
(its reward.components' correctness component, e.g. "math"; see
`jaxrl_llm.eval`). This file is intentionally short: everything lives in the library.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://): checkpoints "
                               "are read from it, results written to <workdir>/eval/.")
_HF_PATH = flags.DEFINE_string("hf_path", "", "Evaluate this HF checkpoint directory instead.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed, as in launch/train.py.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  from jaxrl_llm import config as config_lib
  from jaxrl_llm import eval as eval_lib
  from jaxrl_llm import sharding
  sharding.maybe_initialize_distributed(_DISTRIBUTED.value)
  cfg = config_lib.from_configdict(_CONFIG.value)
  eval_lib.evaluate_run(cfg, _WORKDIR.value, hf_path=_HF_PATH.value, step=_STEP.value)


if __name__ == "__main__":
  app.run(main)
