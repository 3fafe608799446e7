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
for s in sys.argv[3:]:
    k, v = s.split("=", 1); ks = k.split("."); d = data
    for kk in ks[:-1]: d = d.setdefault(kk, {})
    d[ks[-1]] = yaml.safe_load(v)
data["episode"]["length"] = 3; data.pop("fixed", None); data.setdefault("heuristic", {})["warmup_epochs"] = 1
cfg = TrainingConfig.from_dict(data)
task = load_config_task(cfg)
env = MorphogeneticEnv(cfg, task=task)
pol = make_policy(sys.argv[2], env, cfg, seed=0)
from torch.profiler import profile, ProfilerActivity
with NissaHub([]) as hub:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter(); EpisodeRunner(env, pol, hub=hub, profile=load_profile("minimal")).run(1); print("3 epochs", time.perf_counter() - t0)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
