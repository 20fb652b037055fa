"""Training (SPEC section 6): one shared training loop and the stage-1 and stage-2 modules
that plug into it. The configs are in `moe.config.train`; the DiT pieces that evaluation also
uses (the dual holder, flow matching, the held-out measurement) are in `moe.dit`."""
