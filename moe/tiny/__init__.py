"""The embedded tiny default: a CPU test-bed with the real pipeline's shapes, no downloads.

components.py   tiny Wan VAE (an encoder that keeps content, a decoder that inverts it), text encoder
model_set.py    `lora-moe models tiny`: both tiny experts and their components in one folder
pretrain.py     a short pre-training of the tiny experts on synthetic clips
synth.py        the procedural surgical-like clip set (`lora-moe data synth`)
workflow.py     every stage in one process (`lora-moe workflow run`)
"""
