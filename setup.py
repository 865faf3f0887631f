"""bclip: backdoor poisoning and its mitigation in CLIP-style models, in JAX."""

from setuptools import find_packages, setup

setup(
    name="bclip",
    version="0.1.0",
    description="Backdoor poisoning and cleaning of CLIP-style models in JAX/Flax.",
    packages=find_packages(include=["bclip", "bclip.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9.7",
        "ml_collections>=1.0",
        "clu>=0.0.12",
        # clu's TensorBoard writer is built on tf.summary.
        "tensorflow-cpu>=2.16; platform_machine=='x86_64'",
        "tensorflow>=2.16; platform_machine!='x86_64'",
        "tensorboard>=2.16",
        "array-record>=0.5",
        "numpy>=1.26",
        "pillow>=10",
        "tokenizers>=0.19",
        "ftfy>=6",  # the text repair CLIP applies before its BPE
        "matplotlib>=3.8",
        "safetensors>=0.4",  # pretrained weights in and out, in open_clip's layout (numpy API: no pickle)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "filelock>=3"],
        # Orbax reads and writes gs:// checkpoints through google-cloud-storage (TPU pods, GCS workdirs).
        "gcs": ["google-cloud-storage"],
    },
)
