"""Import shim: MLflow models registered before the layout change pickle `pipeline.pyfunc_model.EmbeddingPyfunc`.
The code is in pipeline/serving/pyfunc.py (tests/test_registry_compat.py loads such a model)."""
from pipeline.serving.pyfunc import EmbeddingPyfunc, signature  # noqa: F401
