"""Inference stage: conditioning from text/tokens/audio -> sampling -> wav, 30 fps motion, plots."""
