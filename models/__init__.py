"""Flax NNX ports of the grounded VLMs (GLaMM, OMG-LLaVA) and their parts."""
