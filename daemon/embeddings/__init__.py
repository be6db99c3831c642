"""Embedding models: spec detection, our BERT encoder, mlx-lm decoders pooled, the batching engine."""
