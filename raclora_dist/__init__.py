"""raclora_dist: RAC-LoRA fine-tuning, distributed (FSDP2 / DeepSpeed ZeRO) under Ray Train."""

__version__ = "0.1.0"
