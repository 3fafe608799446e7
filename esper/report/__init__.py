"""``python -m esper.report RUN_DIR``: one self-contained HTML page of a run, with plots.

Reads the run's JSONL telemetry (``--backends jsonl --run-dir DIR``) and draws accuracy per env
with lifecycle events, the env x slot stage timeline, blueprint analytics, reward components,
PPO learning curves, anomalies and governor actions, and the run's configuration
(:mod:`esper.report.build`). Nothing is imported here, so a command that only may write a
report (``esper.train --report``) does not load the plotting library before it has to.
"""
