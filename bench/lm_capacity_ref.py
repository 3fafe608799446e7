"""Capacity gap on the embedded grammar task, with plain PyTorch causal transformers.

Growing a language-model host can only pay if a small transformer falls clearly short of a
larger one after the same training. This reference trains both with ordinary `nn.Module`s (no
Esper engine, so it checks the corpus, not the engine) and reports test loss, perplexity and
next-token accuracy, beside the unigram and bigram perplexities of the test split (counts from
the training split) as "is it learning at all" references. Run:

``OMP_NUM_THREADS=1 python bench/lm_capacity_ref.py --seeds 0,1 --json /tmp/lm_capacity.json``

small: 1 block, d_model 32, 2 heads, MLP 64; large: 4 blocks, d_model 64, 4 heads, MLP 256
(`--sizes small,large,small2,small4` adds the small width with 2 and 4 blocks).
Both: pre-LayerNorm blocks, learned positions, untied output, AdamW (lr 3e-3, cosine to 0),
batch 32, gradient clipping at 1.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esper.tasks.grammar import make_grammar_task
from esper.tasks.sequence import SequenceTask


@dataclass(frozen=True)
class LMConfig:
    """Shape of one causal transformer."""

    blocks: int
    d_model: int
    heads: int
    mlp: int


SIZES: dict[str, LMConfig] = {
    "small": LMConfig(blocks=1, d_model=32, heads=2, mlp=64),
    "large": LMConfig(blocks=4, d_model=64, heads=4, mlp=256),
    # The small model's width with more blocks: what growing depth alone could reach.
    "small2": LMConfig(blocks=2, d_model=32, heads=2, mlp=64),
    "small4": LMConfig(blocks=4, d_model=32, heads=2, mlp=64),
}


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.heads:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by heads {cfg.heads}")
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp), nn.GELU(), nn.Linear(cfg.mlp, cfg.d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CausalLM(nn.Module):
    """Token + learned position embedding, pre-LN blocks, final LayerNorm, linear readout."""

    def __init__(self, cfg: LMConfig, vocab: int, seq_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(seq_len, cfg.d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab)

    def forward(self, x: Tensor) -> Tensor:
        h = self.tok(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 256) -> tuple[float, float]:
    """Mean next-token cross-entropy (nats) and accuracy over every position of (x, y)."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, x.shape[0], batch):
        logits = model(x[i : i + batch])
        target = y[i : i + batch]
        loss += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        correct += int((logits.argmax(-1) == target).sum())
    model.train()
    return loss / y.numel(), correct / y.numel()


def ngram_ppl(task: SequenceTask) -> dict[str, float]:
    """Test perplexity of add-0.1 unigram and bigram models counted on the training split."""
    v = task.num_classes
    tx, ty = task.train_x.flatten(), task.train_y.flatten()
    sx, sy = task.test_x.flatten(), task.test_y.flatten()
    uni = torch.bincount(ty, minlength=v).double() + 0.1
    uni_nll = -(uni / uni.sum()).log()[sy].mean()
    bi = torch.bincount(tx * v + ty, minlength=v * v).double().view(v, v) + 0.1
    bi_nll = -(bi / bi.sum(1, keepdim=True)).log()[sx, sy].mean()
    return {"unigram_ppl": math.exp(float(uni_nll)), "bigram_ppl": math.exp(float(bi_nll))}


def train(task: SequenceTask, cfg: LMConfig, *, epochs: int, batch: int, lr: float,
          seed: int) -> dict[str, float]:
    """Train one model from seed `seed`; test metrics after the last epoch."""
    torch.manual_seed(seed)
    model = CausalLM(cfg, task.num_classes, task.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    steps = epochs * math.ceil(task.train_size / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(task.train_size, generator=gen)
        for i in range(0, task.train_size, batch):
            idx = perm[i : i + batch]
            logits = model(task.train_x[idx])
            loss = F.cross_entropy(logits.flatten(0, 1), task.train_y[idx].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    seconds = time.perf_counter() - start
    train_loss, _ = evaluate(model, task.train_x, task.train_y)
    test_loss, test_acc = evaluate(model, task.test_x, task.test_y)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "train_loss": train_loss,
        "test_loss": test_loss,
        "test_ppl": math.exp(test_loss),
        "test_acc": test_acc,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1", help="comma-separated grammar task seeds")
    parser.add_argument("--sizes", default="small,large", help=f"models, from {sorted(SIZES)}")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--model-seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        parser.error(f"unknown sizes {unknown}; allowed: {sorted(SIZES)}")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        task = make_grammar_task(seed=seed, seq_len=args.seq_len, train_size=args.train_size)
        ref = ngram_ppl(task)
        results = {
            size: train(task, SIZES[size], epochs=args.epochs, batch=args.batch, lr=args.lr,
                        seed=args.model_seed)
            for size in sizes
        }
        rows.append({"task_seed": seed, **ref, **results})
        print(f"seed {seed}: unigram ppl {ref['unigram_ppl']:.2f}, bigram ppl "
              f"{ref['bigram_ppl']:.2f}", flush=True)
        for size, r in results.items():
            print(f"  {size:6s} {r['params']:7d} params  train loss {r['train_loss']:.3f}  "
                  f"test loss {r['test_loss']:.3f}  ppl {r['test_ppl']:.3f}  "
                  f"acc {r['test_acc']:.3f}  ({r['seconds']:.0f}s)", flush=True)
        if "small" in results and "large" in results:
            rows[-1]["ppl_ratio"] = results["large"]["test_ppl"] / results["small"]["test_ppl"]
            print(f"  large/small ppl: {rows[-1]['ppl_ratio']:.3f}", flush=True)
    if args.json:
        config = {**vars(args), "sizes": {k: asdict(SIZES[k]) for k in sizes}}
        with open(args.json, "w") as f:
            json.dump({"config": config, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
