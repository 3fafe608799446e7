"""The named presets (``--preset NAME``): data only, each a partial config over the schema's
defaults (:class:`esper.simic.config.TrainingConfig`), validated when one is chosen."""

from __future__ import annotations

from typing import Any

# Shared by the language-model presets (lm, tinystories): quick gates, a heuristic that grows
# every seed as early as it may, and PPO entropy at half the default (seed 002's TinyStories row).
_LM_GATES = {"min_training_epochs": 1, "shadow_epochs": 0, "min_probation_epochs": 0}
_LM_HEURISTIC = {"warmup_epochs": 1, "plateau_epochs": 1, "plateau_delta": 100.0, "max_seeds": 3,
                 "wait_for": "nothing", "drop_threshold": 3.0, "probation_patience": 2, "fossilize_threshold": 0.0}
_LM_ENTROPY = {"op": 0.005, "slot": 0.0025, "blueprint": 0.0025, "tempo": 0.001}

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The setting the learned controller trains on (``python -m esper.train``): the cheapest
    # episode found where growth clearly pays (bench/preset_search/LOG.md). 12x12 images, 1024
    # training images, 20-epoch episodes; growth pays only if it starts early here, so the
    # heuristic's thresholds were tuned on task seed 0 to germinate from epoch 2.
    "ppo": {
        "task": {"train_size": 1024, "val_size": 256, "image_size": 12, "num_classes": 10},
        "kasmina": {"batch_size": 32, "val_batch_size": 256, "host_lr": 0.1, "seed_lr": 0.1,
                    "blueprints": ["conv_light", "conv_heavy", "depthwise", "bottleneck"],
                    "gates": {"min_training_epochs": 1, "shadow_epochs": 0, "min_probation_epochs": 0}},
        "episode": {"length": 20, "envs": 16},
        "heuristic": {"warmup_epochs": 1, "plateau_epochs": 1, "plateau_delta": 100.0, "max_seeds": 3,
                      "drop_threshold": 8.0, "probation_patience": 2},
        "fixed": {"epochs": [1, 4, 7]},
        # Rent 0.04 (not 0.02): at 0.02 the controller added 3 x conv_light, more parameters
        # than the heuristic; at 0.04 it adds fewer and stays as accurate (README, Results).
        "reward": {"rent": 0.04},
        "ppo": {"lr": 5e-4, "gamma": 0.99, "gae_lambda": 0.95, "epochs": 4, "minibatch_envs": 4,
                "hidden_size": 64, "lstm_hidden_size": 64, "rounds": 3},
    },
    # Language modelling on the embedded grammar corpus (no files): a one-block transformer
    # grown with MLP blocks, attention heads and LoRA attention. AdamW, not SGD: SGD left
    # transformer hosts far behind and unstable (README, language-model hosts). Entropy and
    # plateau settings follow the reference's TinyStories row (seed 002): entropy half the
    # default, plateau threshold 0.3 instead of 0.5.
    # Chosen on task seed 1 (4 envs, host seed 7; README): 30-epoch episodes (static keeps
    # improving too), every seed germinated as early as it may ("nothing" to wait for), and seeds
    # at half the host's learning rate (test perplexity ratio grown/static 0.98 at 2x the host's
    # rate, 0.92 at 1x, 0.88 at 0.5x and at 0.25x).
    "lm": {
        "task": {"name": "grammar", "seq_len": 64, "train_size": 2048, "val_size": 256, "test_size": 1024},
        "kasmina": {"host": "lm_small", "batch_size": 32, "val_batch_size": 256, "optimizer": "adamw",
                    "host_lr": 0.003, "seed_lr": 0.0015, "weight_decay": 0.01,
                    "gates": _LM_GATES},
        "episode": {"length": 30, "envs": 8},
        "heuristic": _LM_HEURISTIC,
        "fixed": {"blueprint": "block", "epochs": [1, 4, 7]},
        "features": {"plateau_delta": 0.3},
        "ppo": {"entropy_coef": _LM_ENTROPY,
                "hidden_size": 64, "lstm_hidden_size": 64, "rounds": 3},
    },
    # TinyStories (a local copy: task.data_dir names the file or its folder; nothing is
    # downloaded), byte-level, 128-byte windows.
    "tinystories": {
        # 16k windows (2 MB of text) per epoch: the whole 1.9 GB training file is too much for an
        # episode of epochs; set task.train_size null for all of it.
        "task": {"name": "tinystories", "seq_len": 128, "train_size": 16384, "val_size": 512, "test_size": 512},
        "kasmina": {"host": "lm_base", "batch_size": 32, "val_batch_size": 128, "optimizer": "adamw",
                    "host_lr": 0.002, "seed_lr": 0.001, "weight_decay": 0.01,
                    "gates": _LM_GATES},
        "episode": {"length": 10, "envs": 8},
        "heuristic": _LM_HEURISTIC,
        "fixed": {"blueprint": "block", "epochs": [1, 3, 5]},
        "features": {"plateau_delta": 0.3},
        "ppo": {"entropy_coef": _LM_ENTROPY},
    },
    # A user's own images (task.data_dir: an ImageFolder tree or an .npz/.pt file; see README,
    # "Bring your own data"). A 3-block host (16-32-64 channels) at SGD lr 0.05 with cosine decay
    # trains stably on data it has never seen; the `ppo` preset's early-growth heuristic and
    # blueprints (what the shipped controller knows). Crop on, flip off (a flip changes digits
    # and text). Change first: episode.length (longer for larger data), kasmina.host_lr.
    "images": {
        "task": {"name": "images"},
        "kasmina": {"host": "baseline", "batch_size": 32, "val_batch_size": 256, "host_lr": 0.05, "seed_lr": 0.05,
                    "blueprints": ["conv_light", "conv_heavy", "depthwise", "bottleneck"],
                    "gates": {"min_training_epochs": 1, "shadow_epochs": 0, "min_probation_epochs": 0}},
        "episode": {"length": 20, "envs": 8},
        "heuristic": {"warmup_epochs": 1, "plateau_epochs": 1, "plateau_delta": 100.0, "max_seeds": 3,
                      "drop_threshold": 8.0, "probation_patience": 2},
        "fixed": {"epochs": [1, 4, 7]},
        "reward": {"rent": 0.04},
        "ppo": {"lr": 5e-4, "epochs": 4, "minibatch_envs": 4, "hidden_size": 64, "lstm_hidden_size": 64},
    },
    # A user's own text (task.data_dir: a folder of files matching task.pattern, or one file),
    # byte-level, 64-byte windows, on the `lm` preset's host and growth settings.
    "text": {
        "task": {"name": "text", "seq_len": 64},
        "kasmina": {"host": "lm_small", "batch_size": 32, "val_batch_size": 256, "optimizer": "adamw",
                    "host_lr": 0.003, "seed_lr": 0.0015, "weight_decay": 0.01, "gates": _LM_GATES},
        "episode": {"length": 20, "envs": 8},
        "heuristic": _LM_HEURISTIC,
        "fixed": {"blueprint": "block", "epochs": [1, 4, 7]},
        "features": {"plateau_delta": 0.3},
        "ppo": {"entropy_coef": _LM_ENTROPY, "hidden_size": 64, "lstm_hidden_size": 64},
    },
    "cifar10": {
        "task": {"name": "cifar10", "train_size": None, "val_size": 5000, "test_size": None, "flip": True},
        "kasmina": {"host": "baseline", "batch_size": 128, "val_batch_size": 1000},
        "episode": {"length": 25, "envs": 16},
        "heuristic": {"warmup_epochs": 5, "plateau_epochs": 3},
    },
    "cifar10_deep": {
        "task": {"name": "cifar10", "train_size": None, "val_size": 5000, "test_size": None, "flip": True},
        "kasmina": {"host": "deep", "batch_size": 128, "val_batch_size": 1000},
        "episode": {"length": 40, "envs": 16},
        "heuristic": {"warmup_epochs": 8, "plateau_epochs": 3},
    },
}
