"""Cluster launchers (submitit) for training, packing and inference jobs; they call the avflow stages."""
