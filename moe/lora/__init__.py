"""Vanilla LoRA: target spec, layer, injector and file format (SPEC sections 2-3)."""
