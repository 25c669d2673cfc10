"""Data: synthetic verifiable tasks, TFDS builders, and batching pipelines.

  tasks     synthetic arithmetic / countdown problems and their verifiers
  builders  TFDS builders (synthetic, local JSONL / Parquet, preference) and
            `load_split`, all read without TensorFlow
  pipeline  `DataConfig`, tokenization, padding, SFT packing, and the
            sharded, resumable `DataIterator`
"""

from jaxrl_llm.data import builders, pipeline, tasks  # noqa: F401  (re-exported)
from jaxrl_llm.data.builders import (  # noqa: F401  (re-exported)
    Examples,
    follows_arithmetic_rule,
    load_split,
    valid_preference_pair,
)
from jaxrl_llm.data.pipeline import (  # noqa: F401  (re-exported)
    DataConfig,
    DataIterator,
    EncodedSplit,
    encode_split,
    make_batch,
    pack,
)
