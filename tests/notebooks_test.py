"""The tutorial notebooks: stored stripped and in sync with their source, and they run.

Every notebook in notebooks/ executes top to bottom in a fresh `python3` kernel
on CPU, with `JAXRL_NOTEBOOK_TEST=1` (the notebooks shrink their runs further)
and the Agg matplotlib backend; a cell that raises fails the test. The kernel
sees one CPU device: the 8 fake devices of conftest.py are for the sharding
tests, not for the tutorials.
"""
import ast
import importlib.util
import os
import pathlib
import re
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 240
COLAB = "https://colab.research.google.com/github/jaxrl-llm/jaxrl_llm/blob/main/notebooks/"
# XLA's CPU compiler at its lowest optimisation level: the notebooks' tiny models
# spend far longer compiling their steps than running them, and the tests check
# that the cells run, not how fast the compiled code is.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _ids(paths):
  return [p.stem for p in paths]


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """Environment of the notebook kernels (and a `python3` kernelspec if none exists)."""
  from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
  with pytest.MonkeyPatch.context() as mp:
    try:
      KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
      from ipykernel import kernelspec
      prefix = tmp_path_factory.mktemp("jupyter")
      kernelspec.install(prefix=str(prefix), kernel_name="python3")
      jupyter_path = [str(prefix / "share" / "jupyter"), os.environ.get("JUPYTER_PATH", "")]
      mp.setenv("JUPYTER_PATH", os.pathsep.join(p for p in jupyter_path if p))
    mp.setenv("JAXRL_NOTEBOOK_TEST", "1")
    mp.setenv("MPLBACKEND", "Agg")
    mp.setenv("JAX_PLATFORMS", "cpu")
    mp.setenv("XLA_FLAGS", FAST_COMPILE_FLAGS)
    mp.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    yield


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, kernel_env, tmp_path):
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(tmp_path)}})
  start = time.perf_counter()
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{path.name}: a cell raised\n{e}", pytrace=False)
  except nbclient.exceptions.CellTimeoutError as e:
    pytest.fail(f"{path.name}: a cell ran longer than {CELL_TIMEOUT_S} s\n{e}", pytrace=False)
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, f"{path.name}: {[f'{o.ename}: {o.evalue}' for o in errors]}"
  print(f"{path.name}: {time.perf_counter() - start:.1f} s")


def test_the_five_tutorials_exist():
  assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"], NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_stripped(path):
  """No outputs, no execution counts, no execution timings: outputs stay out of git."""
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    where = f"{path.name} cell {i}"
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{where} has outputs"
      assert cell.execution_count is None, f"{where} has an execution count"
    assert "execution" not in cell.metadata, f"{where} has execution timings"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_opens_with_badge_install_and_hardware_note(path):
  nb = nbformat.read(path, as_version=4)
  title, install, hardware = nb.cells[:3]
  assert f"({COLAB}{path.name})" in title.source, "Colab badge must link to this notebook"
  # The install runs only when the package is missing (never in a clone or here).
  assert re.search(r"try:\n\s+import jaxrl_llm.*\nexcept ImportError:\n\s+%pip install",
                   install.source), install.source
  assert hardware.source.startswith("**Hardware.**")


def test_notebooks_match_their_generator():
  """notebooks/*.ipynb are written by scripts/make_notebooks.py; edit the cells there."""
  spec = importlib.util.spec_from_file_location("make_notebooks",
                                                ROOT / "scripts" / "make_notebooks.py")
  make_notebooks = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_notebooks)
  assert sorted(f"{n}.ipynb" for n in make_notebooks.NOTEBOOKS) == [p.name for p in NOTEBOOKS]
  assert make_notebooks.main(["--check"]) == 0, (
      "a notebook differs from scripts/make_notebooks.py: run python scripts/make_notebooks.py")


def test_quickstart_notebook_config_is_configs_quickstart():
  """Notebook 02 builds configs/quickstart.py's recipe (absent from the installed package)."""
  from jaxrl_llm import config as config_lib
  nb = nbformat.read(NOTEBOOK_DIR / "02_grpo_quickstart.ipynb", as_version=4)
  source = next(c.source for c in nb.cells if "arithmetic_rl_recipe(" in c.source)
  call = next(n.value for n in ast.parse(source).body
              if isinstance(n, ast.Assign) and [t.id for t in n.targets] == ["c"])
  recipe = eval(compile(ast.Expression(call), "notebook 02", "eval"),  # noqa: S307
                {"config_lib": config_lib})
  spec = importlib.util.spec_from_file_location("quickstart", ROOT / "configs" / "quickstart.py")
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  assert recipe.to_dict() == quickstart.get_config().to_dict()
