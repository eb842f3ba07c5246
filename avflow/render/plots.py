"""Figures of a generated (or recorded) sample: mel, mouth controls, head pose over time.

Shared by `avflow generate` (PNG files) and training (TensorBoard images at validation).
"""

from __future__ import annotations

import numpy as np

from avflow.data.corpus import MOUTH_CONTROLS

QUATERNION_POSE_NAMES = ("qw", "qx", "qy", "qz", "tx", "ty", "tz")


def sample_figure(mel: np.ndarray, expression: np.ndarray, head_pose: np.ndarray, frame_rate: float,
                  reference_mel: np.ndarray | None = None):
    """A matplotlib Figure (Agg backend, no display needed); `reference_mel` adds the recorded mel above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = np.arange(mel.shape[0]) / frame_rate
    mels = ([("recorded mel", reference_mel)] if reference_mel is not None else []) + [("mel band", mel)]
    figure, axes = plt.subplots(len(mels) + 2, 1, figsize=(10, 2.4 * (len(mels) + 2)), sharex=True)
    for axis, (label, values) in zip(axes, mels):
        axis.imshow(values.T, origin="lower", aspect="auto", extent=(0, seconds[-1], 0, values.shape[1]))
        axis.set_ylabel(label)
    controls, pose_axis = axes[len(mels)], axes[len(mels) + 1]
    for index, name in enumerate(MOUTH_CONTROLS):
        controls.plot(seconds, expression[:, index], label=name)
    controls.set_ylabel("mouth controls")
    controls.legend(loc="upper right", fontsize=7)
    names = QUATERNION_POSE_NAMES if head_pose.shape[1] == 7 else [f"pose {i}" for i in range(head_pose.shape[1])]
    for index, name in enumerate(names):
        pose_axis.plot(seconds, head_pose[:, index], label=name)
    pose_axis.set_ylabel("head pose")
    pose_axis.set_xlabel("seconds")
    pose_axis.legend(loc="upper right", fontsize=7, ncol=len(names))
    figure.tight_layout()
    return figure
