"""The Qwen2 transformer family (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen; Qwen3 q/k norm): Hugging Face folders, KV cache state."""
