"""Wan2.2 DiTs: presets, checkpoint formats and key mapping, loading into diffusers."""
