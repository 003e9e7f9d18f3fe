"""Layer 3, serving: the llama.cpp runtime (a base loaded once, adapters hot-applied, the prompt
cache, grammars), conversations, the OpenAI-compatible server, the adapter registry and the
choice of model and adapters that ``run`` and ``serve`` share."""
