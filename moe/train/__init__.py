"""Training: configs, flow matching, the dual-DiT holder, one shared training loop, and the
stage-1 and stage-2 modules that plug into it (SPEC section 6)."""
