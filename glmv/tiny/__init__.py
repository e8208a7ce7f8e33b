"""Random-weight checkpoints in the exact Hugging Face layout of each GLM-V variant."""
