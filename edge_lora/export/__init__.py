"""Exports of a converted model and its adapters to other serving stacks (vLLM), and the check
that the exported deployment answers as edge-lora does."""
