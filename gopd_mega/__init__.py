"""gopd-mega: Generalized On-Policy Distillation (G-OPD / ExOPD) on megatron-core."""

__version__ = "0.1.0"
