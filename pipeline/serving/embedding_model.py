"""The registered embedding model as MLflow models-from-code: MLflow copies this file into the model and runs it
to load the model, so loading unpickles nothing (a pickled PythonModel runs whatever its bytes say).
`pipeline` comes from the model's shipped code (code_paths) or the loading process's own tree."""
import mlflow.models

from densevse.pipeline.serving.pyfunc import EmbeddingPyfunc

mlflow.models.set_model(EmbeddingPyfunc())
