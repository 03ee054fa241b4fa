"""Serving: the registered MLflow models (pyfunc.py, loaded from embedding_model.py / captioner_model.py),
embedding new input (embedder.py), REST (rest.py) and describing new images (describe.py)."""
