"""Search over a trained embedding: vectors.py (FAISS indexes), index.py (building an index of a shard set),
query.py (searching it)."""
