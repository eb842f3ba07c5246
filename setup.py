from setuptools import find_packages, setup

setup(
    name="avflow",
    version="0.1.0",
    description="AV-Flow: joint text-to-speech and talking-avatar motion generation by flow matching",
    packages=find_packages(include=["avflow", "avflow.*", "launch", "launch.*"]),
    python_requires=">=3.10",
    # torch is deliberately a range the locally installed CPU wheel satisfies, so pip never swaps it for
    # a multi-GB CUDA build; install torch first (see README).
    install_requires=[
        "torch>=2.11",  # the oldest release CI tests (its device-image job); FSDP2 and FlexAttention need it
        "numpy",
        "scipy",
        "pyyaml",
        "soundfile",
        "soxr",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "safetensors",
        "imageio-ffmpeg",
        "moviepy<2",  # TensorBoard's add_video encodes with moviepy.editor, which moviepy 2 removed
        "librosa",  # pYIN pitch of avflow evaluate (and the demo's report)
        "monotonic-alignment-search",  # Glow-TTS's MAS in Cython (phoneme durations); a wheel needing only numpy
        "phonemizer",  # espeak-ng phonemes of the text-to-tokens front end (needs the espeak-ng library, apt)
        "num2words",  # numbers and ordinals spelled out by the text normalization
    ],
    extras_require={
        "asr": ["transformers"],
        "deepspeed": ["deepspeed"],
        "slurm": ["submitit"],
        # webdataset: tests prove the shards readable by its stock reader; training reads the tars itself
        # (shards/README.md says why)
        "test": ["pytest", "transformers", "deepspeed", "submitit", "psutil", "webdataset"],
    },
    entry_points={"console_scripts": ["avflow=avflow.cli:main"]},
)
