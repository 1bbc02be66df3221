"""Compressing the base model: vocabulary, layers, low rank, sharing, distillation, quantization, measurement."""
