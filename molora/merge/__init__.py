"""Weighted static merges: merge math, gates, export to PEFT LoRA, merge_and_unload, and
MoLoRA experts built from existing PEFT LoRA adapters."""
