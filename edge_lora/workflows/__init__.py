"""Layer 4: chains of steps (convert -> quantize -> Modelfile -> remember the directory; the
demo). Uses the layers below; the CLI and the TUI call these."""
