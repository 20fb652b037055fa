"""Stage 2 (SPEC section 5): LoRA-MoE on the frozen merged DiTs.

Four experts per target module (`experts`), a per-sample router (`router`), timestep gates
(`gates`), routing modes, teacher and inference smoothing (`routing`), routing losses
(`losses`), the fused layer (`layer`), injection into diffusers' WanTransformer3DModel
(`model`) and the stage-2 file (`file`).
"""
