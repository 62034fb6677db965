"""The Qwen2 transformer family (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen; Qwen3's q/k norm).

``config.py`` (config.json), ``checkpoint.py`` (sharded safetensors folders, fingerprint), ``layers.py`` (the
decoder layer as free functions and ``QwenOps``), ``model.py`` (``Qwen2``: forward, states, plan), ``cache.py``
(``KVState``: the KV cache as the conversation state), ``decode.py`` (the batched decoder), ``fused.py`` (the
Triton ops on CUDA), ``shapes.py`` (random checkpoints of the official shapes).
"""
