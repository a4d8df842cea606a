"""Adapters to the RL stacks our users run (Liger-Kernel's loss signature, TRL, verl)."""
