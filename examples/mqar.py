"""Multi-query associative recall (MQAR, Zoology: Arora et al., 2023): a sequence lists
key-value pairs, then asks for the values of some of the keys again. Trains one small model
per library spec and prints the recall accuracy of each; writes mqar.png when matplotlib is
installed.

    python examples/mqar.py --toy                       (CPU, well under a minute)
    python examples/mqar.py --device cuda               (real size: 64 pairs, d = 128)
"""

import argparse
import time

import torch
from torch import nn

from lm_block import TinyLM


def mqar_batch(batch: int, pairs: int, queries: int, vocab: int, device):
    """Tokens ``k1 v1 ... kN vN q1 .. qM`` with keys in [1, vocab/2) and values above, and
    targets: the value of each query key (-100 elsewhere, ignored by the loss)."""
    half = vocab // 2
    keys = torch.stack([torch.randperm(half - 1, device=device)[:pairs] + 1
                        for _ in range(batch)])
    values = torch.randint(half, vocab, (batch, pairs), device=device)
    asked = torch.stack([torch.randperm(pairs, device=device)[:queries] for _ in range(batch)])
    context = torch.stack([keys, values], 2).reshape(batch, 2 * pairs)
    tokens = torch.cat([context, keys.gather(1, asked)], 1)
    targets = torch.full_like(tokens, -100)
    targets[:, 2 * pairs:] = values.gather(1, asked)
    return tokens, targets


def train(spec: str, args, device) -> float:
    """Train a TinyLM on MQAR; returns the recall accuracy on fresh batches."""
    torch.manual_seed(0)
    model = TinyLM(spec, args.vocab, args.d, args.heads, args.layers).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    for _ in range(args.steps):
        tokens, targets = mqar_batch(args.batch, args.pairs, args.queries, args.vocab, device)
        logits, _ = model(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, args.vocab), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        tokens, targets = mqar_batch(256 if not args.toy else 8, args.pairs, args.queries,
                                     args.vocab, device)
        pred = model(tokens)[0].argmax(-1)
        asked = targets != -100
        return (pred[asked] == targets[asked]).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default="gla,gated_deltanet,retnet")
    ap.add_argument("--toy", action="store_true", help="tiny sizes, a few steps (for tests)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    sizes = (dict(vocab=32, pairs=4, queries=4, d=32, heads=2, layers=1, steps=3, batch=4,
                  lr=3e-3) if args.toy else
             dict(vocab=8192, pairs=64, queries=64, d=128, heads=2, layers=2, steps=3000,
                  batch=64, lr=1e-3))
    for k, v in sizes.items():
        setattr(args, k, v)
    results = {}
    for spec in args.specs.split(","):
        t0 = time.perf_counter()
        results[spec] = train(spec, args, args.device)
        print(f"{spec:18s} recall accuracy {results[spec]:.3f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(results), list(results.values()))
    ax.set_ylabel("MQAR recall accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{args.pairs} pairs, d={args.d}, {args.steps} steps")
    fig.tight_layout()
    fig.savefig("mqar.png", dpi=120)
    print("wrote mqar.png")


if __name__ == "__main__":
    main()
