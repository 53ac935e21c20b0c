"""Segment Anything (SAM) in Flax NNX: GLaMM's grounding encoder (ViT-H image encoder, prompt
encoder, mask decoder) and mask post-processing, parity-tested against `segment_anything`."""

from models.sam.config import SamConfig, SamImageEncoderConfig, SamMaskDecoderConfig
from models.sam.config import SamPromptEncoderConfig
from models.sam.sam import Sam

__all__ = ["Sam", "SamConfig", "SamImageEncoderConfig", "SamMaskDecoderConfig",
           "SamPromptEncoderConfig"]
