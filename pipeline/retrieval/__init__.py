"""Finding similar cases: the versioned FAISS index with BM25 beside it (index) and hybrid search."""
