"""Layer 3, analysis: what a file costs and how good it is (memory fit, perplexity and KL
divergence, importance matrices) and what it is handed off as (Ollama Modelfiles)."""
