"""Preset search: run static/heuristic(/fixed) on a config for given (task seed, host seed) pairs.

Usage: python run.py NAME CONFIG.yaml --pairs 0:7,1:100 [--policies static,heuristic]
Appends a JSON line to results.jsonl. Runs against a frozen snapshot of esper in /tmp/esper_snap.
"""
import os, sys
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.environ.get("ESPER_SNAP", "/tmp/esper_snap"))
import argparse, json, time
import numpy as np
import torch
torch.set_num_threads(1)
import yaml
import esper
from esper.simic.config import TrainingConfig
from esper.simic.env import MorphogeneticEnv, load_config_task
from esper.simic.runner import EpisodeRunner
from esper.nissa import NissaHub, load_profile
from esper.tamiyo.policies import make_policy

class Rec:
    """Wraps a policy; records the op each env chose each epoch."""
    def __init__(self, pol):
        self.pol, self.ops = pol, []
    def __getattr__(self, k):
        return getattr(self.pol, k)
    def __call__(self, td):
        td = self.pol(td)
        self.ops.append(td["op"].clone())
        return td
    def germ_epochs(self):
        from esper.leyline import Op
        ops = torch.stack(self.ops, 1)  # [N, T]
        return [[int(e) for e in torch.nonzero(ops[i] == int(Op.GERMINATE)).flatten()] for i in range(ops.shape[0])]

p = argparse.ArgumentParser()
p.add_argument("name"); p.add_argument("config")
p.add_argument("--pairs", default="0:7,1:100")
p.add_argument("--policies", default="static,heuristic")
p.add_argument("--set", action="append", default=[], help="section.key=yamlvalue")
a = p.parse_args()
assert esper.__file__.startswith(os.environ.get("ESPER_SNAP", "/tmp/esper_snap")), esper.__file__
data = yaml.safe_load(open(a.config)) or {}
for s in a.set:
    k, v = s.split("=", 1); ks = k.split(".")
    d = data
    for kk in ks[:-1]:
        d = d.setdefault(kk, {})
    d[ks[-1]] = yaml.safe_load(v)
out = {"name": a.name, "config": data, "runs": []}
for pair in a.pairs.split(","):
    ts, hs = (int(x) for x in pair.split(":"))
    dd = json.loads(json.dumps(data)); dd.setdefault("task", {})["seed"] = ts
    dd.setdefault("episode", {})["seed"] = hs; dd["episode"].setdefault("envs", 16)
    dd.setdefault("telemetry", {})["backends"] = []
    cfg = TrainingConfig.from_dict(dd)
    task = load_config_task(cfg)
    run = {"task_seed": ts, "host_seed": hs}
    for spec in a.policies.split(","):
        env = MorphogeneticEnv(cfg, task=task)
        pol = Rec(make_policy(spec, env, cfg, seed=cfg.episode.seed))
        t0 = time.perf_counter(); c0 = time.process_time()
        with NissaHub([]) as hub:
            sums = EpisodeRunner(env, pol, hub=hub, profile=load_profile("minimal")).run(1)
        dt = time.perf_counter() - t0; cpu = time.process_time() - c0
        acc = np.array([s.final_val_acc for s in sums]); best = np.array([s.best_val_acc for s in sums])
        run[spec] = {"mean": float(acc.mean()), "std": float(acc.std()), "best": float(best.mean()),
                     "fossilized": float(np.mean([s.fossilized for s in sums])),
                     "culled": float(np.mean([s.culled for s in sums])),
                     "params": float(np.mean([s.params_added for s in sums])), "s": dt, "cpu": cpu,
                     "traj": [s.trajectory for s in sums[:3]], "germ": pol.germ_epochs()}
        print(f"{a.name} t{ts} h{hs} {spec:10s} {acc.mean():6.2f} ± {acc.std():5.2f}  fos {run[spec]['fossilized']:.2f} cull {run[spec]['culled']:.2f}  {dt:6.1f}s wall {cpu:6.1f}s cpu  germ {pol.germ_epochs()[:4]}", flush=True)
    if "static" in run and "heuristic" in run:
        print(f"   gap heuristic-static = {run['heuristic']['mean'] - run['static']['mean']:+.2f}", flush=True)
    out["runs"].append(run)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl"), "a") as f:
    f.write(json.dumps(out) + "\n")
