"""A noncausal linear-attention spec in an image-token block: patchify images, run
``LinearAttention`` blocks over the patch tokens (every token attends to the whole image),
pool, classify; a few training steps on synthetic images.

    python examples/vision.py [--spec efficientvit] [--toy] [--device cuda]
"""

import argparse

import torch
from torch import nn

from lm_block import Block


class TinyViT(nn.Module):
    """Patch embedding (a strided conv), position embedding, blocks, mean pool, head."""

    def __init__(self, spec: str, image: int, patch: int, d: int, heads: int, layers: int,
                 classes: int):
        super().__init__()
        self.patchify = nn.Conv2d(3, d, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2, d) * 0.02)
        self.blocks = nn.ModuleList(Block(spec, d, heads, norm=nn.LayerNorm, mlp_ratio=2)
                                    for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, images):
        x = self.patchify(images).flatten(2).transpose(1, 2) + self.pos   # [B, tokens, d]
        for block in self.blocks:
            x, _ = block(x)
        return self.head(x.mean(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="efficientvit")
    ap.add_argument("--toy", action="store_true", help="tiny sizes, a few steps (for tests)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    image, patch, d, heads, layers, batch, steps = (
        (16, 4, 32, 2, 1, 8, 3) if args.toy else (64, 4, 256, 8, 4, 64, 200))
    model = TinyViT(args.spec, image, patch, d, heads, layers, classes=2).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        # class 1: a bright square somewhere in the image; class 0: noise only
        images = torch.randn(batch, 3, image, image, device=args.device)
        labels = torch.randint(0, 2, (batch,), device=args.device)
        for i in torch.nonzero(labels).flatten().tolist():
            r, c = torch.randint(0, image - 4, (2,)).tolist()
            images[i, :, r:r + 4, c:c + 4] += 3
        loss = nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    print(f"{args.spec}: {(image // patch) ** 2} image tokens per image, noncausal "
          f"({model.blocks[0].attn.attn.info()['auto_form']})")


if __name__ == "__main__":
    main()
