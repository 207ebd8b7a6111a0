"""saga-kernels: Triton kernels and a thin PyTorch driver for SAGA (frozen-MLLM-supervised retrieval)."""
from setuptools import find_packages, setup

# what python -m saga_train needs beyond the kernels (torch SDPA and faiss-cpu are the defaults)
TRAIN = ["transformers>=4.57", "tokenizers", "safetensors", "tqdm", "pillow", "scipy", "scikit-learn", "faiss-cpu",
         "matplotlib"]
# the tests also run the peers they compare against
TEST = TRAIN + ["pytest", "pytest-benchmark", "liger-kernel==0.8.5", "cut-cross-entropy",
                "pytorch-metric-learning==2.9.0", "trl==1.16.0", "ruff==0.17.6"]
# saga_kernels.integrations.trl serves TRL's fused-LM-head contract, which appeared in 1.15 (tested: 1.16.0)
TRL = ["trl>=1.15,<1.17"]

setup(
    name="saga-kernels",
    version="0.1.0",
    description="Fused log-prob/GRPO, attention-probe and streaming metric-loss kernels, and the SAGA trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["saga_kernels", "saga_kernels.*", "saga_train", "saga_train.*"]),
    # the shipped synthetic supervisor (saga_train/synthetic/weights/supervisor-<hash>/: safetensors, configs, sha256)
    package_data={"saga_train.synthetic": ["weights/*/*"]},
    python_requires=">=3.10",
    # torch is deliberately unpinned from above: GPU users bring their own build.
    install_requires=["torch>=2.4", "triton>=3.2; platform_system == 'Linux'", "numpy"],
    extras_require={"train": TRAIN, "test": TEST, "trl": TRL, "gpu": ["faiss-gpu", "flash-attn", "liger-kernel"]},
    entry_points={"console_scripts": ["saga-train=saga_train.__main__:main"]},
)
