"""DenseVSE orchestration: config, CLI, preprocessing runs, training and evaluation."""
