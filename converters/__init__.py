"""Converters: HF checkpoints and PEFT adapters -> GGUF (merge, adapters, quantization)."""
