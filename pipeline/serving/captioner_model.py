"""The registered captioner as MLflow models-from-code (see embedding_model.py)."""
import mlflow.models

from densevse.pipeline.serving.pyfunc import CaptionerPyfunc

mlflow.models.set_model(CaptionerPyfunc())
