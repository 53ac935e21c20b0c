"""One-time conversion of released PyTorch checkpoints to Orbax, streaming one tensor at a time."""
