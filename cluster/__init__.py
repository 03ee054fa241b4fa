"""Running DenseVSE on Ray clusters: job submission (jobs.py), launcher/KubeRay configs, the local multi-node recipe."""
