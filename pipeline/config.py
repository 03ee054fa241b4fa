"""pipeline.yaml, typed. Everything is validated before any work starts; errors name the bad key.

    cfg = load_config("pipeline.yaml", overrides=["train.epochs=3", "dataset.kind=flickr8k"])
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError, field_validator,
                      model_validator)

from densevse.pipeline import storage
from densevse.pipeline.errors import ConfigError
from densevse.stages import FEATURES, REGIONS, STEPS


# A location (pipeline/storage.py): a local Path, or a UPath for an object-store URI; written as the path or URI.
# A bad scheme is an error naming the key.
Location = Annotated[Any, BeforeValidator(storage.location), PlainSerializer(str, return_type=str,
                                                                             when_used="json-unless-none")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Strict):
    name: str = "default"
    output_dir: Location = Path("runs/default")  # a local path or URI: best models, summaries, report, run.log
    seed: int = 0


class SyntheticConfig(Strict):
    num_images: int = Field(3000, ge=1)
    image_size: int = Field(224, ge=64, le=1024)
    min_objects: int = Field(2, ge=2)
    max_objects: int = Field(4, ge=2)
    captions_per_image: int = Field(5, ge=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_images: int = Field(1000, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _objects(self):
        if self.max_objects < self.min_objects:
            raise ValueError("max_objects must be >= min_objects")
        if self.test_images >= self.num_images:
            raise ValueError("test_images must be smaller than num_images")
        return self


TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}


class TableConfig(Strict):
    """dataset.kind=table (pipeline/datasets/table.py): one row per (image, caption); option names as
    img2dataset's. The columns themselves are checked when the table is read (DatasetError naming them)."""
    file: str | None = None  # the table, relative to dataset.root; image paths in it are relative to its folder
    input_format: Literal["csv", "tsv", "jsonl", "parquet"] | None = None  # None: from the file's suffix
    url_col: str = "url"  # an http(s) URL or a local path
    caption_col: str = "caption"
    split_col: str | None = None  # None: every row is in default_split
    default_split: str = "train"  # also for a row whose split cell is empty
    save_additional_columns: list[str] = []  # kept per image in gold["columns"] (the shard's json)

    @model_validator(mode="after")
    def _format(self):
        if self.file is not None and self.input_format is None \
                and Path(self.file).suffix.lower() not in TABLE_FORMATS:
            raise ValueError(f"input_format: cannot tell the format of {self.file!r} from its suffix; set "
                             f"input_format to one of {sorted(TABLE_FORMATS.values())}")
        return self


class Img2datasetConfig(Strict):
    """dataset.kind=img2dataset (pipeline/datasets/img2dataset.py): img2dataset's webdataset output folder."""
    split: str = "train"  # img2dataset output has no splits: every sample goes here
    save_additional_columns: list[str] = []  # columns of its <shard>.parquet kept in gold["columns"]


class DatasetConfig(Strict):
    kind: Literal["synthetic", "flickr8k", "coco", "karpathy", "flickr30k_entities", "table",
                  "img2dataset"] = "synthetic"
    root: Location | None = None  # the dataset folder; for synthetic, where the generated set is written
    splits: list[str] = ["train", "val", "test"]
    limit: int | None = Field(None, ge=1)  # at most this many images per split (quick runs)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    table: TableConfig = Field(default_factory=TableConfig)
    img2dataset: Img2datasetConfig = Field(default_factory=Img2datasetConfig)

    @model_validator(mode="after")
    def _root(self):
        if self.kind != "synthetic" and self.root is None:
            raise ValueError(f"dataset.root is required for dataset.kind={self.kind!r}")
        if self.kind == "synthetic" and self.root is not None and not storage.is_local(self.root):
            raise ValueError(f"root: the synthetic set is generated with local file I/O, so its root must be a "
                             f"local path, not {self.root!r}")
        if self.kind == "table" and self.table.file is None:
            raise ValueError("table.file: required for dataset.kind='table' (the table, relative to dataset.root)")
        return self


class StageConfig(Strict):
    """One preprocessing stage: which implementation, its parameters, and its Ray resources.

    `params` is given as a mapping and validated once, here, into the stage's own `Params` model: every actor
    and Ray worker gets the typed object and never re-validates it."""
    impl: str
    params: Any = {}
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    batch_size: int = Field(16, ge=1)
    concurrency: int | None = Field(None, ge=1)  # actors (model stages; null: as many as fit) or max parallel tasks (null: no cap)
    memory_mb: int | None = Field(None, ge=1)  # Ray logical memory per task / actor (null: Ray's default)


class StagesConfig(Strict):
    """The four preprocessing stages in order. Defaults are pipeline.yaml's: the project's Detectron2 detector,
    EfficientNet-Lite0 features and Stanza parser."""
    ingest: StageConfig = StageConfig(impl="image_caption", batch_size=64)
    regions: StageConfig = StageConfig(impl="detectron2", num_cpus=0.3, memory_mb=1536)
    features: StageConfig = StageConfig(impl="efficientnet_lite0", num_cpus=0.3, batch_size=32, memory_mb=1536)
    parse: StageConfig = StageConfig(impl="stanza", num_cpus=0.3, batch_size=64, memory_mb=1536)

    @model_validator(mode="after")
    def _typed_params(self):
        for field in type(self).model_fields:
            sc: StageConfig = getattr(self, field)
            step = STEPS[field]  # the step's own registry: another step's impl is unknown here
            if sc.impl not in step:
                raise ValueError(f"{field}.impl: unknown {step.kind} {sc.impl!r}; known: {step.names()}")
            params_cls = step.get(sc.impl).Params
            if isinstance(sc.params, params_cls):
                continue
            raw = sc.params.model_dump() if isinstance(sc.params, BaseModel) else sc.params
            try:
                typed = params_cls.model_validate(raw if raw is not None else {})
            except ValidationError as e:
                raise ValueError("; ".join(f"{field}.params.{m}" for m in _describe(e).split("; "))) from None
            object.__setattr__(sc, "params", typed)  # no re-validation of the whole StageConfig
        if FEATURES.get(self.features.impl).passthrough and not REGIONS.get(self.regions.impl).provides_feats:
            raise ValueError(f"features.impl: {self.features.impl} takes the features the regions stage computes, "
                             f"but regions.impl {self.regions.impl} computes none (use detectron2_features)")
        return self


class ShardConfig(Strict):
    samples_per_shard: int = Field(256, ge=1)
    dir: Location | None = None  # default: <run.output_dir>/shards; a local path or URI


class RayConfig(Strict):
    address: str | None = None  # None: start a local Ray; "auto" or ray://...: join a cluster
    num_cpus: int | None = Field(None, ge=1)


class MlflowConfig(Strict):
    tracking_uri: str | None = None  # None: no tracking; e.g. http://127.0.0.1:5000 or sqlite:///mlflow.db
    experiment: str = "densevse"
    registered_model: str = "densevse-hmlstm"


class TrainConfig(Strict):
    model: Literal["hmlstm", "vse", "dvsa"] = "hmlstm"
    vse_text: Literal["gru", "mean"] = "gru"  # the vse baseline's sentence encoder
    # HM-LSTM's caption trees: the parser's, or a branching tree over the same words (ablation; models/trees.py)
    text_tree: Literal["parse", "left_branching", "right_branching"] = "parse"
    epochs: int = Field(10, ge=1)
    patience: int | None = Field(None, ge=0)  # stop after this many epochs without a better val rsum (None/0: off)
    prefetch: int = Field(2, ge=0)  # batches prepared ahead by a background thread (0: inline)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(2e-3, gt=0)
    embed_dim: int = Field(256, ge=8)
    hidden_dim: int = Field(256, ge=8)
    margin: float = Field(0.2, ge=0)
    hardest_negative: bool = False
    # epochs of the summed hinge before hardest negatives take over: from a random start the hardest-negative loss
    # collapses every embedding to one point (VSE++ starts from a trained model)
    hardest_negative_warmup: int = Field(0, ge=0)
    # HM-LSTM's sentence-image score adds the mean of each phrase's best region match (Niu et al.); off: the
    # global match only (ablation)
    phrase_score: bool = True
    # HM-LSTM's image side: the regions -> image tree-LSTM (Niu et al.); off: each row projected linearly (ablation)
    region_tree: bool = True
    phrase_loss_weight: float = Field(1.0, ge=0)
    grad_clip: float = Field(2.0, gt=0)
    num_workers: int = Field(1, ge=1)
    # CPUs, and torch threads, per Ray Train worker (null: the cluster's CPUs shared among the workers, at most
    # one node's). On the 2-core machine 2 threads were no faster than 1 in the default run (pipeline.yaml sets 1)
    cpus_per_worker: int | None = Field(None, ge=1)
    use_gpu: bool = False
    max_failures: int = Field(2, ge=0)
    storage_path: Location | None = None  # Ray Train's checkpoints (path or URI); default <run.output_dir>/ray_train
    word_vectors: Literal["glove-6b-50d", "random"] = "glove-6b-50d"
    max_tokens: int = Field(40, ge=4)
    seed: int = 0


class EvalConfig(Strict):
    split: str = "test"
    ks: list[int] = [1, 5, 10]
    captions_per_image: int = Field(5, ge=1)


class CaptionerConfig(Strict):
    """The m-RNN description model (pipeline/captioner.py); Ray workers, GPU, failures and word vectors as in train."""
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    hidden_dim: int = Field(256, ge=8)
    cell: Literal["gru", "lstm"] = "gru"
    dropout: float = Field(0.2, ge=0, lt=1)
    attention: bool = True  # captions attend over the image's region features (models/mrnn.py)
    min_word_count: int = Field(1, ge=1)  # rarer training words become <unk> (never generated)
    max_len: int = Field(24, ge=4)  # longest training caption (longer ones are skipped) and generation cap
    beam_size: int = Field(7, ge=1)  # Karpathy & Fei-Fei's DVSA
    no_repeat_ngram: int = Field(3, ge=0)  # no n-gram twice in a description (0: off)
    region_phrases: bool = True  # also train region -> phrase pairs from gold links
    top_k_regions: int = Field(10, ge=0)  # regions described per image (detector order)
    registered_model: str = "densevse-captioner"


class PipelineConfig(Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    shards: ShardConfig = Field(default_factory=ShardConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    captioner: CaptionerConfig = Field(default_factory=CaptionerConfig)

    @field_validator("run")
    @classmethod
    def _name(cls, v: RunConfig):
        if not v.name or "/" in v.name:
            raise ValueError("run.name must be a non-empty name without '/'")
        return v

    @model_validator(mode="after")
    def _synthetic_root(self):
        """The synthetic set is generated with local file I/O (pipeline/datasets/synthetic.py), by default under
        the output dir: one in object storage needs a local dataset.root for it (a driver-local cache would hide
        the images from the workers of other nodes, which a URI output dir says there are)."""
        if self.dataset.kind == "synthetic" and self.dataset.root is None and not storage.is_local(self.run.output_dir):
            raise ValueError(f"dataset.root: the synthetic set is generated with local file I/O, so with run.output_dir "
                             f"{self.run.output_dir} in object storage set dataset.root to a local path for it")
        return self

    @property
    def shard_dir(self) -> storage.Location:
        return self.shards.dir or self.run.output_dir / "shards"

    @property
    def dataset_root(self) -> storage.Location:
        return self.dataset.root or self.run.output_dir / "dataset"


def _describe(e: ValidationError) -> str:
    """`dataset.synthetic.num_imgs: Extra inputs are not permitted`. Our own validators raise messages that
    start with the sub-key ("features.params.foo: ..."), so they are joined onto the location with a dot."""
    out = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            if ": " in msg:  # starts with its sub-key (a whole-config validator: with its whole key)
                out.append(f"{loc}.{msg}" if loc else msg)
            else:
                out.append(f"{loc or '<root>'}: {msg}")
        else:
            out.append(f"{loc or '<root>'}: {msg}")
    return "; ".join(out)


def apply_override(data: dict, override: str) -> None:
    """`a.b.c=value`; the value is parsed as YAML, so numbers, booleans, lists and null work."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key part")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {override!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level")
    for o in overrides or []:
        apply_override(data, o)
    return parse_config(data, source=str(path or "<defaults>"))


def parse_config(data: dict, source: str = "<dict>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid config {source}: {_describe(e)}") from None


def redact_uri(value: str) -> str:
    """A URI with the password of its user info replaced (`http://user:***@host`): what may be logged."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        return value
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if not at:
        return value
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{host}{slash}{path}"


def public_config(cfg: PipelineConfig) -> dict:
    """The config as JSON-ready values, with every credential in a URI redacted (mlflow.tracking_uri with
    `user:password@`, a ray.address, a dataset URL): what goes into MLflow params, logged config files,
    checkpoints and summaries, which other people read. The config itself keeps them (a submitted job needs
    them)."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return redact_uri(v) if isinstance(v, str) else v

    return clean(cfg.model_dump(mode="json"))


def dump_config(cfg: PipelineConfig, redact: bool = False) -> str:
    """The config as YAML; `redact`: public_config's (credentials replaced), for anything logged or shared."""
    return yaml.safe_dump(public_config(cfg) if redact else cfg.model_dump(mode="json"), sort_keys=False)
