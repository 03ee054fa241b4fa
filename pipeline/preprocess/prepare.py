"""The one orchestrator step before any preprocessing work: make sure every stage's model files exist.

Where the config names the project's own models, they are trained here on first use (once; cached by spec
hash): the synthetic defaults (`.cache/detector-synthetic`, `.cache/parser/stanza-synthetic`) and the real-data
ones of pipeline.real.yaml (`.cache/detector-coco`: the CPU recipe on ../shared/data's COCO photos;
`.cache/parser/stanza-gum`: GUM), the latter only where ../shared/data holds their training data. Any other model path is checked, and a missing
one fails here, naming its config key, rather than in every actor. Stages never import a trainer; validators
do no file I/O. Each actor also resolves its paths when it loads the model, on the machine that runs it.

Both trainers run one torch thread (faster than two on a small shared machine), so a first run trains the
detector and the parser at the same time, the parser in a second process: the first run's wait is the longer
training, not the sum.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from densevse.models import detector as det
from densevse.models import parser as stanza_models
from densevse.pipeline.errors import ConfigError

log = logging.getLogger("densevse.prepare")


@dataclass
class Training:
    """A first-use training: `fn` (picklable: it may run in another process) returns what `done` logs."""
    fn: Callable[[], dict]
    done: Callable[[dict], None]


def _train_detector(config: str, spec) -> dict:
    from densevse.pipeline.stage_models import detector as trainer

    return trainer.train(config, spec, quiet=True)


def _train_parser(model_dir: str, treebank: str | None = None) -> dict:
    from densevse.pipeline.stage_models import parser as trainer

    return trainer.train(model_dir, trainer.TrainSpec.for_treebank(treebank) if treebank else None)


def run_trainings(jobs: list[Training]) -> None:
    """Run the first-use trainings at once: the first here, the others each in a spawned process (torch and
    Stanza are not fork-safe once loaded). A failure in any is raised here."""
    if len(jobs) <= 1:
        for j in jobs:
            j.done(j.fn())
        return
    with ProcessPoolExecutor(len(jobs) - 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(j.fn) for j in jobs[1:]]
        jobs[0].done(jobs[0].fn())
        for j, f in zip(jobs[1:], futures):
            j.done(f.result())


def own_detector_spec(config: str | Path):
    """The spec of the project's own detector dir `config` names (.cache/detector-synthetic; where
    ../shared/data has the COCO photos, .cache/detector-coco: the cpu recipe, or -coco-large: the cuda recipe,
    trained on the device it is named for), else None: a user's model, only checked."""
    from densevse.pipeline.stage_models import detector as trainer

    for spec in (trainer.DetectorSpec(), trainer.DetectorSpec(dataset="coco"),
                 trainer.DetectorSpec(dataset="coco", device="cuda")):
        if Path(config).resolve() == trainer.default_out(spec).resolve() and \
                all(Path(r).is_dir() for r in spec.roots):
            return spec
    return None


def ensure_detector(key: str, p, spec=None, jobs: list[Training] | None = None) -> None:
    """The project's own detector dir (own_detector_spec) trained once and cached (keyed by its spec hash);
    any other config/weights must exist, else ConfigError naming `key`. With `jobs`, a needed training is added
    there (run_trainings) instead of run now."""
    spec = spec or (own_detector_spec(p.config) if p.weights is None else None)
    if spec is not None:
        from densevse.pipeline.stage_models import detector as trainer

        if trainer.is_trained(Path(p.config), spec):
            return
        log.warning("%s: the project's detector %s not trained yet (or its spec changed): training it now with "
                    "Detectron2 (once, then cached; synthetic ~2 min, coco ~40 min on an idle 2-core machine)",
                    key, p.config)

        def done(r):
            log.warning("%s: detector trained in %.0f s; held-out proposal recall@0.5 (top 19) = %s",
                        key, r["train_s"], r.get("recall@0.5_top19"))
        _run_or_add(Training(functools.partial(_train_detector, p.config, spec), done), jobs)
        return
    try:
        det.resolve(p.config, p.weights)
        if not Path(p.config).is_dir():
            det.load_cfg(p.config)  # a bad file or an unknown model-zoo name fails here, not in every actor
    except FileNotFoundError as e:
        raise ConfigError(f"{key}.config: {e}") from None


def _run_or_add(job: Training, jobs: list[Training] | None) -> None:
    if jobs is None:
        run_trainings([job])
    else:
        jobs.append(job)


def ensure_detector_features(key: str, p, jobs: list[Training] | None = None) -> None:
    ensure_detector(key, p, jobs=jobs)
    if p.head_weights is not None and not Path(p.head_weights).is_file():
        raise ConfigError(f"{key}.head_weights: weights file not found: {p.head_weights}")


def ensure_efficientnet(key: str, p, jobs=None) -> None:
    if p.weights is not None and not Path(p.weights).is_file():
        raise ConfigError(f"{key}.weights: weights file not found: {p.weights}")


GUM = Path("../shared/data/gum")  # the treebank of pipeline.real.yaml's parser, relative to the repo root


def own_parser_treebank(model_dir) -> str | None | bool:
    """What the project's own parser dir `model_dir` is trained on: None for the synthetic default, the GUM
    treebank path for .cache/parser/stanza-gum (when ../shared/data has it); False for a user's model dir."""
    from densevse.pipeline.stage_models import parser as trainer

    d = Path(model_dir).expanduser().resolve()
    if d == stanza_models.DEFAULT_DIR.resolve():
        return None
    if GUM.is_dir() and d == trainer.treebank_dir(GUM).resolve():
        return str(GUM)
    return False


def ensure_parser(key: str, p, jobs: list[Training] | None = None) -> None:
    """The project's own parser dir (own_parser_treebank) trained once and cached; any other Stanza models must
    exist."""
    bank = own_parser_treebank(p.model_dir) if p.model_dir is not None else False
    if bank is not False and not stanza_models.explicit_paths(p):
        from densevse.pipeline.stage_models import parser as trainer

        spec = trainer.TrainSpec.for_treebank(bank) if bank else trainer.TrainSpec()
        if trainer.cached_manifest(p.model_dir, spec) is None:
            log.info("%s: training the project's Stanza parser into %s on %s (once: synthetic ~1 min, GUM ~20 min; "
                     "cached afterwards; `densevse parser train` does the same)", key, p.model_dir,
                     bank or "the synthetic grammar")

            def done(m):
                log.info("%s: parser trained in %ss, held-out bracket F1 %.4f", key, m["train_seconds"]["total_s"],
                         m["bracket_f1"])
            _run_or_add(Training(functools.partial(_train_parser, str(p.model_dir), bank), done), jobs)
        return
    missing = stanza_models.missing_models(p)
    if missing:
        raise ConfigError(f"{key}.{missing}")


# impl -> check (or first-use training) of its model files
PREPARE = {"detectron2": ensure_detector, "detectron2_boxhead": ensure_detector,
           "detectron2_features": ensure_detector_features,
           "efficientnet_lite0": ensure_efficientnet, "efficientnet_lite0_crops": ensure_efficientnet,
           "stanza": ensure_parser}


def prepare_stage_models(cfg) -> None:
    """Check, or train on first use, the model files of every configured stage (see the module docstring):
    every check runs first, so a bad path fails before any training starts."""
    jobs: list[Training] = []
    for name in type(cfg.stages).model_fields:
        sc = getattr(cfg.stages, name)
        check = PREPARE.get(sc.impl)
        if check is not None:
            check(f"stages.{name}.params", sc.params, jobs=jobs)
    run_trainings(jobs)
