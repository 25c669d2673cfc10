"""benchmarks/partition_check.py on 8 CPU devices: the W2 cases compile through both
attention routes (the GPU run compiles the same cases for 8 mock GPUs), and a failing
case is recorded with its error instead of stopping the run."""
import json
import os


def test_partition_check_records_each_case(tmp_path, monkeypatch):
  import jax

  from benchmarks import partition_check
  out = tmp_path / "partition_8.json"
  before = jax.config.read("jax_mock_gpu_topology")
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored afterwards
  try:  # main() sets the mock GPU topology (inert on CPU); restored for the other tests
    info = partition_check.main(["--sizes=smoke", "--meshes=N,1,1;1,N/2,2",
                                 "--impls=xla,bogus", "--skip_ops", f"--out={out}"])
  finally:
    jax.config.update("jax_mock_gpu_topology", before)
  cases = {c["case"]: c for c in info["cases"]}
  assert len(cases) == 8
  for mesh in ("(8, 1, 1)", "(1, 4, 2)"):
    for route in ("shard_map", "partitioner"):
      assert cases[f"w2 smoke mesh={mesh} attention=xla route={route}"]["ok"]
      bad = cases[f"w2 smoke mesh={mesh} attention=bogus route={route}"]
      assert not bad["ok"] and "attention_impl='bogus'" in bad["error"]
  assert json.load(open(out)) == info
  # Sharded autotuning would wait for the mocked processes (openxla/xla#28959).
  assert "--xla_gpu_shard_autotuning=false" in os.environ["XLA_FLAGS"]


def test_op_cases_cover_batch_and_head_sharding(monkeypatch):
  """The op cases reach cuDNN's lowering (which a CPU refuses) for both shardings."""
  import jax

  from benchmarks import partition_check
  before = jax.config.read("jax_mock_gpu_topology")
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
  try:
    info = partition_check.main(["--sizes="])
  finally:
    jax.config.update("jax_mock_gpu_topology", before)
  names = [c["case"] for c in info["cases"]]
  assert names == [f"op shard={s} mask={m} grad={g}" for s in ("batch", "heads")
                   for m in (False, True) for g in (False, True)]
  for case in info["cases"]:
    assert not case["ok"] and "cuDNN is not detected" in case["error"], case
