"""Diffusion training on the curated extra set and the seed set, sampling and evaluation."""
