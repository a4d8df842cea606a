"""The reference NGRPO trainer: TRL's GRPOTrainer with ngrpo-kernels inside (``NGRPOTrainer``), a tiny
CPU preset that runs in minutes, and the Qwen2.5-Math-7B recipe for 8 GPUs. ``ngrpo-train --help``."""
