"""Module trees with the real ldm parameter names of SD1.5 / SDXL UNets (from the manifests).

``tiny=True`` (default): every layer is 8 wide (conv_in takes 4 channels), so patch files
and attention units for it are small. ``tiny=False``: the real shapes; build it on the meta
device. These trees do not run a UNet forward; their Linear / Conv2d leaves and attention
modules do run, which is what patches and units touch.
"""

import torch
import torch.nn.functional as F
from torch import nn
from weightgen import manifest_shapes

PREFIX = "diffusion_model."
W = 8


class Attention(nn.Module):
    """ldm CrossAttention's interface: heads, to_q/k/v (no bias), to_out = [Linear, Dropout]."""

    def __init__(self, query_dim, context_dim, inner, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def forward(self, x, context=None, mask=None, **kwargs):
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        b, n, inner = q.shape
        q, k, v = (t.reshape(b, -1, self.heads, inner // self.heads).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, inner)
        return self.to_out[1](self.to_out[0](o))


class Params(nn.Module):
    """A leaf holding plain parameters (norms, embeddings)."""


def _ensure(root, path):
    m = root
    for part in path.split("."):
        if not hasattr(m, part) or getattr(m, part) is None:
            m.add_module(part, nn.Module())
        m = getattr(m, part)
    return m


def build_tree(family: str, tiny: bool = True) -> nn.Module:
    shapes = {k[len(PREFIX) :]: s for k, s in manifest_shapes(f"base_unet_{family}_ldm").items()}
    root = nn.Module()
    done = set()
    for key in sorted(shapes):
        path, _, attr = key.rpartition(".")
        if path.endswith((".attn1", ".attn2")) or path.rsplit(".", 2)[-2:-1] in (["attn1"], ["attn2"]):
            apath = path if path.endswith(("attn1", "attn2")) else path[: path.index(".attn") + 6]
            if apath in done:
                continue
            done.add(apath)
            q = shapes[apath + ".to_q.weight"]
            k = shapes[apath + ".to_k.weight"]
            args = (W, W, W, 2) if tiny else (q[1], k[1], q[0], 8)
            parent, _, name = apath.rpartition(".")
            _ensure(root, parent).add_module(name, Attention(*args))
            continue
        if path in done:
            continue
        done.add(path)
        parent, _, name = path.rpartition(".")
        shape = shapes[key]
        bias = path + ".bias" in shapes
        wshape = shapes.get(path + ".weight", shape)
        if len(wshape) == 4:
            cin = 4 if (tiny and path == "input_blocks.0.0") else (W if tiny else wshape[1])
            mod = nn.Conv2d(cin, W if tiny else wshape[0], wshape[2], padding=wshape[2] // 2, bias=bias)
        elif len(wshape) == 2:
            mod = nn.Linear(W if tiny else wshape[1], W if tiny else wshape[0], bias=bias)
        else:
            mod = Params()
            for a in ("weight", "bias"):
                if f"{path}.{a}" in shapes:
                    s = shapes[f"{path}.{a}"]
                    mod.register_parameter(a, nn.Parameter(torch.randn([W] * len(s) if tiny else s)))
        _ensure(root, parent).add_module(name, mod)
    return root


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    return t.view(_INT[t.element_size()]) if t.is_floating_point() else t


def same_bits(a: dict, b: dict) -> bool:
    """Bit-for-bit equality of two state dicts (same keys, dtypes, shapes and bits)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(_bits(a[k]), _bits(b[k])) for k in a
    )
