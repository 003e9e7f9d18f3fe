"""Layer 2: HF checkpoints and PEFT adapters -> GGUF (streamed merge, adapters, quantization).
Imports only ``edge_lora.core``."""
