"""`densevse index | search | serve`: an embedding index of a shard set, searching it, the search page."""
from __future__ import annotations

import json
import sys

from densevse.pipeline.cli.args import common_args, load


def _defaults(args):
    """(config, shard dir, model, index dir): the flags, else the config's shards, best model and
    <output_dir>/index. The config's stages are where query stages take their model files from: a checkpoint's
    own config names none that is loaded (pipeline/serving/embedder.py: trusted_stages)."""
    cfg = load(args)
    from densevse.pipeline import storage
    from densevse.pipeline.trained import best_path

    shards = storage.location(getattr(args, "shards", None) or cfg.shard_dir)
    index = storage.location(getattr(args, "index", None) or cfg.run.output_dir / "index")
    return cfg, shards, args.model or str(best_path(cfg.run.output_dir, cfg.train.model)), index


def cmd_index(args) -> int:
    """Embed every image, region, caption and phrase of a shard set into a FAISS index (pipeline/search/index.py)."""
    from densevse.pipeline.search.index import build
    from densevse.pipeline.serving.embedder import load as load_embedder

    cfg, shards, model, out = _defaults(args)
    info = build(shards, load_embedder(model, cfg.stages), out, splits=args.splits, exact_below=args.exact_below,
                 log=lambda m: print(m, file=sys.stderr))
    n = info["counts"]
    items = sum(n[k] for k in ("image", "region", "text", "phrase"))
    print(f"index in {out}: {n['image']} images, {n['region']} regions, {n['text']} captions, {n['phrase']} "
          f"phrases in {info['seconds']}s ({items / max(info['seconds'], 1e-9):.0f} items/s)", file=sys.stderr)
    print(json.dumps(info, indent=1))
    return 0


def cmd_search(args) -> int:
    """Search an index: QUERY -> images; --image PHOTO -> captions; --regions PHRASE -> regions of any image. JSON."""
    from densevse.pipeline.search.query import Index, draw

    given = [q for q in (args.query, args.image, args.regions) if q]
    if len(given) != 1:
        print("densevse search: give exactly one of QUERY, --image PHOTO, --regions PHRASE", file=sys.stderr)
        return 2
    cfg, _, _, root = _defaults(args)
    ix = Index.open(root, model=args.model, stages=cfg.stages)
    if args.image:
        kind, hits = "captions", ix.captions(args.image, args.k)
    elif args.regions:
        kind, hits = "regions", ix.regions(args.regions, args.k)
    else:
        kind, hits = "images", ix.images(args.query, args.k)
    out = {"query": given[0], "kind": kind, "index": str(root), "hits": hits}
    if args.draw:
        out["drawn"] = [str(p) for p in draw(hits, ix, args.draw, kind)]
    print(json.dumps(out, indent=1))
    return 0


def cmd_serve(args) -> int:
    """The search page and its JSON API on HOST:PORT (pipeline/search/app.py)."""
    from densevse.pipeline.search.app import serve

    cfg, _, _, root = _defaults(args)
    serve(root, model=args.model, host=args.host, port=args.port, stages=cfg.stages, allow_hosts=args.allow_hosts)
    return 0


def register(subparsers) -> None:
    i = subparsers.add_parser("index", help=cmd_index.__doc__, description=cmd_index.__doc__)
    common_args(i)
    i.add_argument("--shards", default=None, help="shard dir (default: the config's)")
    i.add_argument("--model", default=None, help="checkpoint or MLflow URI, e.g. models:/densevse-hmlstm@champion "
                                                 "(default: <output_dir>/models/<train.model>/best.pt)")
    i.add_argument("--out", dest="index", default=None, help="index dir (default: <output_dir>/index)")
    i.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    i.add_argument("--exact-below", dest="exact_below", type=int, default=100_000,
                   help="sets smaller than this get an exact index, larger an IVF one (default 100000)")
    i.set_defaults(func=cmd_index)

    s = subparsers.add_parser("search", help=cmd_search.__doc__, description=cmd_search.__doc__)
    s.add_argument("query", nargs="?", default=None, help="a sentence: the images it describes")
    s.add_argument("--image", default=None, metavar="PHOTO", help="a photo: the captions that describe it")
    s.add_argument("--regions", default=None, metavar="PHRASE", help="a phrase: the regions of any image it names")
    s.add_argument("--index", default=None, help="index dir (default: <output_dir>/index)")
    s.add_argument("--model", default=None, help="query model (default: the index's own; another one is refused)")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--draw", default=None, metavar="DIR", help="also draw each hit as a PNG in DIR")
    s.add_argument("--config", default="pipeline.yaml", help="pipeline.yaml for the default index dir")
    s.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(func=cmd_search)

    v = subparsers.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    common_args(v)
    v.add_argument("--index", default=None, help="index dir (default: <output_dir>/index)")
    v.add_argument("--model", default=None, help="query model (default: the index's own)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8008)
    v.add_argument("--allow-host", dest="allow_hosts", action="append", default=[], metavar="NAME[:PORT]",
                   help="another Host header to answer (a name or address clients reach this server by; needed "
                        "with --host 0.0.0.0). Others are refused: a guard against DNS rebinding")
    v.set_defaults(func=cmd_serve)
