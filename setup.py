"""Packaging for speechbrain-omc: Online Model Compression for SpeechBrain."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="speechbrain-omc",
    version="0.1.0",
    description=(
        "Online Model Compression (OMC) for federated training of SpeechBrain "
        "ASR models with compressed parameters"
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["speechbrain_omc", "speechbrain_omc.*"]),
    include_package_data=True,
    # The codec kernels' source: compiled on first use by the machine's C++
    # compiler (speechbrain_omc/codec/kernels.py), torch code as the fallback.
    # The federated SynthSpeech hyperparameters (speechbrain_omc.asr), so that
    # an installed package runs the main job and the Flower app without the
    # repository.
    package_data={
        "speechbrain_omc.codec": ["_native/*.cpp"],
        "speechbrain_omc.asr": ["hparams/*.yaml"],
    },
    install_requires=[
        "torch>=2.1,<2.10",
        "torchaudio>=2.1,<2.10",
        "speechbrain>=1.1,<1.2",
        "hyperpyyaml>=1.2",
        "sentencepiece>=0.1.99",
        "soundfile>=0.12",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "flower": ["flwr[simulation]>=1.42,<1.43"],
        "test": ["pytest>=8", "hypothesis>=6.100", "matplotlib"],
        "dev": ["ruff>=0.6", "pytest>=8", "hypothesis>=6.100", "matplotlib"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
