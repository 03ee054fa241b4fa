"""The shard set: the data contract between the steps, as WebDataset's and img2dataset's shards are.

Preprocessing writes a shard set through this package only; training, evaluation, the index, the report and
tracking read it through this package only, so none of them imports another step to read shards. It holds:

    layout       names and paths ({split}-{index:06d}.tar, {shard}.stats.json, manifest.parquet), digests
    write        write_shard: a shard's tar, then its stats (the "finished" marker)
    stats        read_stats, finished_shards, tar_problem, verified_stats, summarize_shards
    manifest     write_manifest, read_manifest, shard_paths (the tars readers take), dataset_sha256
    samples      iter_samples, eval_items, rank_shards: samples out of the tars
    fingerprint  the config fingerprint a shard records (what shaped its bytes), changed_keys

It sits below every step in the import graph: it imports pipeline.storage, pipeline.config, pipeline.errors and
stages.base, never preprocess/, training/, evaluation/, search/, tracking/ or serving/. A shard dir is any
location (pipeline/storage.py): a local path or an object-store URI.
"""
from densevse.pipeline.shardset.fingerprint import (KIND_BLOCKS, RUNTIME_PARAMS, changed_keys, dataset_key,
                                                    fingerprint, path_sha256, recorded_model_files)
from densevse.pipeline.shardset.layout import (MANIFEST, SUMMARY, ShardError, file_sha256, keys_sha256, shard_name,
                                               shard_of, stats_path, tar_path)
from densevse.pipeline.shardset.manifest import (MANIFEST_SCHEMA, dataset_sha256, manifest_shards, read_manifest,
                                                 rejected_samples, shard_paths, write_manifest)
from densevse.pipeline.shardset.samples import eval_items, iter_samples, rank_shards
from densevse.pipeline.shardset.stats import (finished_shards, iter_stats, load_stats, read_stats,
                                              summarize_shards, tar_problem, verified_stats)
from densevse.pipeline.shardset.write import manifest_entry, sample_files, write_shard

__all__ = ["KIND_BLOCKS", "MANIFEST", "MANIFEST_SCHEMA", "RUNTIME_PARAMS", "SUMMARY", "ShardError", "changed_keys",
           "dataset_key", "dataset_sha256", "eval_items", "file_sha256", "finished_shards", "fingerprint",
           "iter_samples", "iter_stats", "keys_sha256", "load_stats", "manifest_entry", "manifest_shards",
           "path_sha256", "rank_shards", "read_manifest", "read_stats", "recorded_model_files", "rejected_samples",
           "sample_files", "shard_name", "shard_of", "shard_paths", "stats_path", "summarize_shards", "tar_path",
           "tar_problem", "verified_stats", "write_manifest", "write_shard"]
