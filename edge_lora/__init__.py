"""edge-lora: HF base + PEFT LoRA adapters -> GGUF, K-quants, hot-applied adapters on a laptop."""

__version__ = "0.1.0"
