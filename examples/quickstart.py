"""Quickstart: write a new linear-attention variant, compile it, read its kernel, train it.

    python examples/quickstart.py            (CPU: kernels run in Triton's interpreter)

The spec below is a made-up variant: a sigmoid-gated scalar decay per head and token, ReLU
feature maps and a normalizer state. linforge proves its class (scalar decay), generates the
recurrent and chunked kernels with their backward, and checks them here against the float64
reference interpreter.
"""

import argparse

import torch

import linforge

SPEC = """
attention gated_relu_attention
    inputs q[K], k[K], v[V], f
    state  S[K, V], z[K]
    S = sigmoid(f) * S + outer(relu(k), v)
    z = sigmoid(f) * z + relu(k)
    o = (relu(q) @ S) / (relu(q) @ z + 1e-6)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="smallest sizes (for tests)")
    args = ap.parse_args()
    B, T, H, K, V = (1, 70, 2, 8, 8) if args.toy else (2, 130, 2, 16, 16)

    attn = linforge.compile(SPEC)
    info = attn.info()
    print(f"{attn.name}: {info['transition_class']}; forms {info['forms']}; "
          f"form='auto' -> {info['auto_form']}")
    source = attn.source("recurrent", "fwd")
    print("--- generated recurrent forward kernel (first 60 lines) ---")
    print("\n".join(source.splitlines()[:60]))
    print(f"--- ({len(source.splitlines())} lines; attn.source('chunk', 'bwd') and "
          "`linforge show` print the others) ---")

    g = torch.Generator().manual_seed(0)
    x = {"q": torch.randn(B, T, H, K, generator=g), "k": torch.randn(B, T, H, K, generator=g),
         "v": torch.randn(B, T, H, V, generator=g), "f": torch.randn(B, T, H, generator=g) + 3}
    w = torch.randn(B, T, H, V, generator=g)
    ref = {n: t.double().requires_grad_() for n, t in x.items()}
    o_ref, _ = attn(**ref, form="reference")
    (o_ref * w.double()).sum().backward()
    for form in ("recurrent", "chunk"):
        xs = {n: t.clone().requires_grad_() for n, t in x.items()}
        o, _ = attn(**xs, form=form)
        (o * w).sum().backward()
        err_o = ((o.double() - o_ref).abs().max() / o_ref.abs().max()).item()
        err_g = max(((xs[n].grad.double() - ref[n].grad).abs().max()
                     / ref[n].grad.abs().max()).item() for n in x)
        print(f"{form:9s}: max relative error vs float64 reference: o {err_o:.1e}, "
              f"gradients {err_g:.1e}")
        assert err_o < 1e-4 and err_g < 1e-4


if __name__ == "__main__":
    main()
