"""Layer 1, the core both converters and the runtime stand on: errors, settings, atomic writes,
progress, GGUF header validation, the format table, the manifest, the output-directory reader
and chat templates. Imports nothing else of edge-lora."""
