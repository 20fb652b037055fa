"""Wan2.2 DiTs at run time, shared by training, evaluation and generation.

expert.py        load one expert and place it: dtype, fp8 storage, device, block swap, compile
block_swap.py    frozen blocks in pinned host memory, copied in one block ahead of use
compile.py       torch.compile per block
dual_dit.py      the high- and low-noise experts as one holder, and the placement policy
flow_matching.py sigmas, noisy latents, the velocity target and the (ROI-weighted) loss
validation.py    the held-out measurement of a variant (base, stage 1, stage 2)
routed_dit.py    the LoRA-MoE forward: router, timestep gates, hints
"""
