"""Multimodal inputs: image and video preprocessing, prompt assembly, 3-D positions, hashing."""
