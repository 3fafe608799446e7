"""The smallest TrainingConfig that still runs every policy end to end (shared by CLI/env tests)."""

TINY = {
    "task": {"train_size": 256, "val_size": 128},
    "kasmina": {"batch_size": 64, "blueprints": ["norm", "conv_small"], "gates": {"min_training_epochs": 1}},
    "episode": {"length": 3, "envs": 2},
    "heuristic": {"warmup_epochs": 1, "plateau_epochs": 1, "blueprints": ["norm", "conv_small"]},
    "fixed": {"blueprint": "conv_small", "epochs": [0]},
    "ppo": {"minibatch_envs": 2},
}
