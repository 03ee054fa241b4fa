"""Stanza pipelines that never download: the project's own trained models (a `densevse parser train` dir with
its models.json) or Stanza's real models in a resources dir."""
from __future__ import annotations

import json
from pathlib import Path


DEFAULT_DIR = Path(".cache/parser/stanza-synthetic")  # the project's own models (.cache/ is git-ignored)
MODELS_JSON = "models.json"  # written by `densevse parser train` (pipeline/stage_models/parser.py)


def resolve_paths(model_dir: str | Path | None, **paths) -> dict:
    """Model paths for stanza.Pipeline: explicit params win; else a `densevse parser train` models.json in model_dir."""
    out = {k: v for k, v in paths.items() if v}
    if model_dir is not None:
        man = Path(model_dir).expanduser() / MODELS_JSON
        if man.is_file():
            m = json.loads(man.read_text())
            for k in ("pos_model_path", "constituency_model_path", "pretrain_path", "tokenize_model_path"):
                if m.get(k) and k not in out:
                    out[k] = str(man.parent / m[k])
    return out


def build_pipeline(lang: str = "en", model_dir: str | Path | None = None, processors: str = "tokenize,pos,constituency",
                   tokenize_pretokenized: bool = True, tokenize_model_path: str | None = None,
                   pos_model_path: str | None = None, constituency_model_path: str | None = None,
                   pretrain_path: str | None = None, pos_pretrain_path: str | None = None,
                   device: str = "cpu", **extra):
    """stanza.Pipeline that never downloads (download_method=None).

    With explicit model paths (our trained models) Stanza needs no resources.json entry for the language, so
    we allow_unknown_language and give it an empty resources.json; with real downloaded models, model_dir's
    resources.json supplies every default path, including the charlm dependencies.
    """
    import stanza

    paths = resolve_paths(model_dir, tokenize_model_path=tokenize_model_path, pos_model_path=pos_model_path,
                          constituency_model_path=constituency_model_path, pretrain_path=pretrain_path)
    kw = dict(lang=lang, processors=processors, download_method=None, tokenize_pretokenized=tokenize_pretokenized,
              tokenize_no_ssplit=True, device=device, logging_level="WARN", **extra)
    if model_dir is not None:
        kw["dir"] = str(Path(model_dir).expanduser())
    pretrain = paths.pop("pretrain_path", None) or pos_pretrain_path
    for proc in ("tokenize", "pos", "constituency"):
        if paths.get(f"{proc}_model_path"):
            kw[f"{proc}_model_path"] = paths[f"{proc}_model_path"]
    if pretrain:
        kw["pos_pretrain_path"] = pos_pretrain_path or pretrain
        if "constituency" in processors:
            kw["constituency_pretrain_path"] = pretrain
    if paths.get("pos_model_path"):  # our own models: no resources.json entry for them
        kw["allow_unknown_language"] = True
        d = Path(kw.get("dir") or Path(paths["pos_model_path"]).parent)
        kw["dir"] = str(d)
        if not (d / "resources.json").is_file():
            d.mkdir(parents=True, exist_ok=True)
            (d / "resources.json").write_text("{}")
    return stanza.Pipeline(**kw)


def explicit_paths(p) -> dict:
    return {k: v for k in ("tokenize_model_path", "pos_model_path", "constituency_model_path", "pretrain_path")
            if (v := getattr(p, k))}


def missing_models(p) -> str | None:
    """Why the configured models cannot load (naming the path), or None. Checked before a run starts."""
    for key, path in explicit_paths(p).items():
        if not Path(path).expanduser().is_file():
            return f"{key}: no such file {path}"
    if explicit_paths(p):
        return None
    if p.model_dir is None:
        from stanza.resources.common import DEFAULT_MODEL_DIR as d
    else:
        d = Path(p.model_dir).expanduser()
    hint = (f"run `densevse models download` (online) or `densevse parser train [--treebank PATH] --out {d}` "
            "(offline; e.g. --treebank ../shared/data/gum)")
    if not Path(d).is_dir():
        return f"model_dir: no such directory {d}; {hint}"
    if (Path(d) / MODELS_JSON).is_file():
        gone = [v for k, v in resolve_paths(d).items() if not Path(v).is_file()]
        return f"model_dir: {d} lists missing model files {gone}" if gone else None
    if not (Path(d) / "resources.json").is_file() or not (Path(d) / p.lang).is_dir():
        return f"model_dir: {d} holds no Stanza models for {p.lang!r} (no resources.json or {p.lang}/); {hint}"
    return None
