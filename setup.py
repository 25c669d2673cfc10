"""Packaging for jaxrl_llm.

The default install is backend-agnostic (plain `jax`, which runs on CPU);
pick an accelerator with the `gpu` or `tpu` extra.
"""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "tensorflow-datasets>=4.9.7",
    "sentencepiece>=0.2",
    "chex>=0.1.88",
    "absl-py>=2.1",
    "ml_collections>=0.1.1",
    "numpy>=1.26",
    "safetensors>=0.4",
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    "sympy>=1.12",  # host-side math answer equivalence
    "pyarrow>=14",  # Parquet prompt datasets
    "qwix>=0.1.8",  # quantized frozen base under LoRA (jaxrl_llm.quantize)
]

# gs:// workdirs: etils.epath (checkpoint metadata, metrics, data files) goes
# through fsspec's gcsfs; orbax writes arrays with tensorstore's own GCS driver.
GCS = ["etils[epath-gcs]", "gcsfs>=2026.4"]

EXTRAS = {
    # torch is pinned to a CPU build used only by the HF parity tests: an
    # unpinned torch pulls a multi-GB CUDA build. The GCS emulator stands in
    # for a bucket in tests/cloud_workdir_test.py. filelock: the tests' shared compilation
    # cache is locked (tests/conftest.py).
    "test": ["pytest>=8", "pytest-xdist>=3.5", "filelock>=3.12", "transformers>=4.51",
             "torch==2.13.0", "tokenizers>=0.20", "jinja2>=3.1", "nbclient>=0.10", "nbformat>=5.10",
             "ipykernel>=6.29", "matplotlib>=3.8", *GCS, "gcp-storage-emulator>=2026.7",
             "wandb>=0.17", "peft>=0.13",
             "datasets>=3.0"],  # real save_to_disk output for the hf_disk reader's test
    "hf": ["tokenizers>=0.20", "jinja2>=3.1"],
    # math reward: math-verify's symbolic equivalence, tried before sympy (rewards.host)
    "math": ["math-verify>=0.7"],
    "notebooks": ["matplotlib>=3.8", "ipykernel>=6.29"],
    "gpu": ["jax[cuda12]>=0.6"],
    "tpu": ["jax[tpu]>=0.6", *GCS],  # TPU pods keep their workdir on GCS
    "gcs": GCS,
    "wandb": ["wandb>=0.17"],  # metrics.wandb_project
    "dev": ["ruff>=0.6"],
}

setuptools.setup(
    name="jaxrl_llm",
    version="0.1.0",
    description="Post-training language models with RL and preference optimization, "
                "rollout to update in one jitted step.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["jaxrl_llm", "jaxrl_llm.*"]),
    package_data={"jaxrl_llm": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
