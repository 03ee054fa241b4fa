"""Registering a trained model in MLflow: the run's figures, the checkpoint as an mlflow.pyfunc model (models
from code, shipping only the library code loading it imports), its version promoted to `champion` when it
scores best.

The embedding model (`finish_run`, registered as cfg.mlflow.registered_model) embeds raw images and captions
with the stage models bundled beside it (pipeline/serving/pyfunc.py); the captioner (`register_captioner`, as
cfg.captioner.registered_model) describes feature vectors.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from densevse.pipeline import code, storage


def finish_run(cfg, run_id: str, history: list[dict], best_path, score: float | None = None) -> int | None:
    """Curves, alignment figure, and the best embedding model logged + registered with the stage models it
    needs for raw input (pipeline/serving/pyfunc.py); the version becomes `champion` when its validation
    `score` beats the current champion's. Returns the version."""
    from densevse.pipeline.serving.embedder import bundled_paths, is_pickle_file
    from densevse.pipeline.serving.pyfunc import signature
    from densevse.pipeline.tracking.figures import alignment_figure
    from densevse.pipeline.trained import EMBEDDING, load_trained

    stages = {name: (sc.impl, sc.params) for name, sc in cfg.stages}
    paths = bundled_paths(stages)
    bundle = {k: str(p.resolve()) for k, p in paths.items() if not is_pickle_file(p)}
    pickled = sorted(set(paths) - set(bundle))  # loading would refuse them (plain pickle): not shipped

    def figures(client):
        if pickled:
            client.set_tag(run_id, "stage_models_not_bundled", f"{', '.join(pickled)}: .pkl weights load with "
                           f"plain pickle; convert them to .pth to serve raw images with the registered model")
        try:
            model, vocab, labels, _ = load_trained(best_path, EMBEDDING)
            fig = alignment_figure(model, vocab, labels, cfg.shard_dir)
            if fig is not None:
                log_figure(client, run_id, fig, "plots/alignment.png")
        except Exception as e:  # noqa: BLE001 - a figure must not lose the trained model
            client.set_tag(run_id, "alignment_figure_error", repr(e)[:500])

    return _log_model(cfg.mlflow.tracking_uri, run_id, history, best_path, "embedding_model.py", signature(),
                      cfg.mlflow.registered_model, figures, extra_artifacts=bundle,
                      input_example=example_input(cfg.shard_dir), score=score)


def example_input(shard_dir):
    """One image (base64 JPEG) and one caption of the first val (else train) sample: the logged input_example."""
    import base64

    import pandas as pd

    from densevse.pipeline.shardset import iter_samples, shard_paths

    for split in ("val", "train"):
        for s in iter_samples(shard_paths(shard_dir, split)[:1], with_image=True):
            text = s["meta"]["captions"][0]["text"]
            return pd.DataFrame({"image": [base64.b64encode(s["jpg"]).decode(), None], "text": [None, text]})
    return None


def register_captioner(cfg, run_id: str, history: list[dict], best_path) -> int | None:
    """Loss curve + the best checkpoint as a pyfunc model registered as cfg.captioner.registered_model."""
    from densevse.pipeline.serving.pyfunc import pyfunc_signature

    return _log_model(cfg.mlflow.tracking_uri, run_id, history, best_path, "captioner_model.py", pyfunc_signature(),
                      cfg.captioner.registered_model)


CHAMPION = "champion"  # the alias users load: models:/<name>@champion
REQUIREMENTS = ["torch", "torchvision", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml", "mlflow", "pillow",
                "stanza", "webdataset", "efficientnet-lite-pytorch"]  # + Detectron2: cluster/install_detectron2.py


def _log_model(uri: str, run_id: str, history: list[dict], best_path, code_model: str, signature, name: str,
               figures=None, extra_artifacts: dict | None = None, input_example=None,
               score: float | None = None) -> int | None:
    """The run's curves (+ `figures(client)`), then the checkpoint `best_path` (a location; MLflow logs a local
    copy of one in object storage) (+ `extra_artifacts`) as an mlflow.pyfunc model registered as `name`,
    shipping the project's library code so the model loads where the project is not installed; then `promote`
    it. `code_model`: a models-from-code file of pipeline/serving (MLflow runs it to load the model; a pickled
    PythonModel would be unpickled instead)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from densevse.pipeline.tracking.figures import curves

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    for fig_name, fig in curves(history).items():
        log_figure(client, run_id, fig, f"plots/{fig_name}.png")
    if figures is not None:
        figures(client)
    model_file = code.ROOT / "pipeline" / "serving" / code_model
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory(prefix="densevse-code-") as tmp, \
            storage.local(best_path) as checkpoint:
        shipped = code.ship([code.module_name(model_file)], Path(tmp))  # only what loading the model imports
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(model_file),
            artifacts={"checkpoint": str(checkpoint), **(extra_artifacts or {})},
            signature=signature, registered_model_name=name, input_example=input_example,
            code_paths=[str(shipped)], pip_requirements=REQUIREMENTS)
        mlflow.set_tag("best_model", str(best_path))
    version = info.registered_model_version
    if version is not None:
        promote(client, name, str(version), score, run_id)
    return version


def promote(client, name: str, version: str, score: float | None, run_id: str) -> bool:
    """Tag the version with its validation score; give it the `champion` alias when there is no champion yet
    or its score is at least the champion's (a version without a score never displaces one with a score)."""
    if score is not None:
        client.set_model_version_tag(name, version, "score", repr(float(score)))
    client.set_model_version_tag(name, version, "run_id", run_id)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # noqa: BLE001 - MlflowException RESOURCE_DOES_NOT_EXIST: no champion yet
        current = None
    if current is not None and current.version != version:
        theirs = current.tags.get("score")
        if theirs is not None and (score is None or float(score) < float(theirs)):
            return False
    client.set_registered_model_alias(name, CHAMPION, version)
    return True


def log_figure(client, run_id: str, fig, artifact: str) -> None:
    """Log a figure to the run, then free it (matplotlib keeps every open figure)."""
    import matplotlib.pyplot as plt

    client.log_figure(run_id, fig, artifact)
    plt.close(fig)
