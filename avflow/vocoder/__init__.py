"""Vocoder stage: natural-log mel -> waveform, by BigVGAN (pretrained weights) or Griffin-Lim (no weights).

Training's validation samples and inference both vocode, so this stage sits below both; it imports only the
data stage's mel features and no model.
"""
