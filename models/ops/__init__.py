"""Triton fused operators for transformer families (RMSNorm+RoPE, gated MLP, fp8 GEMM, LayerNorm+GPTQ projection)."""
