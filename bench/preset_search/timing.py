"""Seconds per epoch (16 envs) for static and fixed-growth (3 seeds germinated at epochs 0,1,2), 5 epochs."""
import os, sys
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, "/tmp/esper_snap")
import time, yaml, torch
torch.set_num_threads(1)
from esper.simic.config import TrainingConfig
from esper.simic.env import MorphogeneticEnv, load_config_task
from esper.simic.runner import EpisodeRunner
from esper.nissa import NissaHub, load_profile
from esper.tamiyo.policies import make_policy
data = yaml.safe_load(open(sys.argv[1])); data.setdefault("telemetry", {})["backends"] = []
for s in sys.argv[2:]:
    k, v = s.split("=", 1); ks = k.split("."); d = data
    for kk in ks[:-1]: d = d.setdefault(kk, {})
    d[ks[-1]] = yaml.safe_load(v)
L = 5
data["episode"]["length"] = L; data["fixed"] = {"epochs": [0, 1, 2], "blueprint": data.get("fixed", {}).get("blueprint", "conv_light")}
data.setdefault("heuristic", {})["warmup_epochs"] = 1
cfg = TrainingConfig.from_dict(data)
task = load_config_task(cfg)
res = []
for spec in ("static", "fixed"):
    env = MorphogeneticEnv(cfg, task=task)
    pol = make_policy(spec, env, cfg, seed=0)
    with NissaHub([]) as hub:
        t0 = time.perf_counter(); EpisodeRunner(env, pol, hub=hub, profile=load_profile("minimal")).run(1); res.append((time.perf_counter() - t0) / L)
print(" ".join(sys.argv[2:]) or "base", "s/epoch static %.2f fixed %.2f" % tuple(res), flush=True)
