"""Wan2.2 DiT files: checkpoint formats, key mapping, fp8 storage, what kind of file a path holds,
the VAE and text-encoder components and their encoding, and loading into diffusers."""
