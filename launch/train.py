"""Launch a training run from a config file.

  python launch/train.py --config=configs/quickstart.py --workdir=/tmp/quickstart \
      [--config.trainer.num_steps=50 ...]

The config file returns an ml_collections ConfigDict; dotted flags override
its fields. It is converted once into validated dataclasses and handed to
`jaxrl_llm.trainer.run`. On a multi-host TPU pod or GPU cluster the same
command runs on every host (`jax.distributed` is initialised from the
environment, see `jaxrl_llm.sharding.distributed_init_args`; launchers:
launch/tpu_pod.sh, launch/slurm_gpu.sbatch, launch/local_multiprocess.py).
This file is intentionally short: everything lives in the library.
"""

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed: 'auto' initialises it when the environment describes several "
    "processes (JAX_* variables, a SLURM step of several tasks, a TPU pod's "
    "TPU_WORKER_HOSTNAMES); 'on' always (JAX detects the cluster, e.g. on TPU VMs; "
    "launch/tpu_pod.sh passes it); 'off' never.")
flags.mark_flags_as_required(["config", "workdir"])


def _maybe_init_distributed():
  """Multi-process when the flag or the environment says so."""
  from jaxrl_llm import sharding
  if sharding.maybe_initialize_distributed(_DISTRIBUTED.value):
    import jax
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def _prepare_data_once(cfg, workdir):
  """Multi-process: process 0 builds the datasets first, the others wait.

  TFDS builds into one shared data_dir must not race; pinning data_dir to
  <workdir>/tensorflow_datasets also lets an SFT warm-start stage (run in
  <workdir>/sft_warmstart) reuse that build instead of racing on its own.
  """
  import dataclasses

  import jax
  from jax.experimental import multihost_utils

  from jaxrl_llm.data import builders
  data = dataclasses.replace(cfg.data, data_dir=builders.resolve_data_dir(cfg.data, workdir))
  evaluates = cfg.data.kind == "prompt" and cfg.eval.num_examples > 0  # as trainer._common
  # A remote workdir builds into a per-process local cache (builders.resolve_data_dir):
  # then every process builds its own copy.
  per_process = "://" in str(workdir) and not cfg.data.data_dir
  if jax.process_index() == 0 or per_process:
    builders.prepare(data, ("train", "test") if evaluates else ("train",), workdir=workdir)
  multihost_utils.sync_global_devices("jaxrl_llm: datasets prepared")
  return dataclasses.replace(cfg, data=data)


def _parse_flags(argv):
  """absl's flag parsing; a mistyped --config.<field> is named with the fix, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on "
             "flags.")
  except (AttributeError, KeyError) as e:
    # ml_collections raises these (wrapping each other) for an override of a field the
    # config does not have: "'grup_size'\nDid you mean "group_size" instead of ...?"
    detail = e
    while isinstance(detail, BaseException) and detail.args:
      detail = detail.args[0]
    detail = str(detail)
    key = re.match(r"'([^']*)'", detail)
    hint = re.search(r"Did you mean \S+", detail)
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    named = [o for o in overrides if key and key.group(1) in o.split(".")]
    flag = named[0] if named else " / ".join(overrides) or "--config"
    sys.exit(f"{flag}: the config has no field {key.group(1) if key else detail!r}"
             f"{' (' + hint.group(0) + '?)' if hint else ''}. Fix the dotted name: the fields "
             "of each section are those of its dataclass (ModelSpec, DataConfig, RLConfig, ... "
             "see jaxrl_llm/config.py).")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # progress goes to stdout; --verbosity=0 for all logs
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  _maybe_init_distributed()
  from jaxrl_llm import config as config_lib
  from jaxrl_llm import trainer
  try:
    cfg = config_lib.from_configdict(_CONFIG.value)
  except ValueError as e:  # the message names the field and the valid values
    sys.exit(f"Invalid config: {e}")
  import jax
  if jax.process_count() > 1:
    cfg = _prepare_data_once(cfg, _WORKDIR.value)
  trainer.run(cfg, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
