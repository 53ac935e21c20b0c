"""GLaMM (GCG inference): CLIP vision tower + mm_projector + LLaMA decoder + text_hidden_fcs + SAM."""
