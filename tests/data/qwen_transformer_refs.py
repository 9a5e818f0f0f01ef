"""Reference numbers for the Qwen-Image(-Layered) transformer tests, computed with diffusers (side environment only).

Run: python tests/data/qwen_transformer_refs.py \
         tests/data/qwen_transformer_refs.safetensors   (in an environment with diffusers==0.42.1, not the project's)

A tiny diffusers QwenImageTransformer2DModel (2 blocks, width 64, 2 heads of 32, text width 48, RoPE axes 8/12/12)
with the two Layered switches on, every parameter drawn deterministically (generator seeded per key with
zlib.crc32(key)). Weights are rounded to float16 BEFORE the float32 run and stored as float16 (exact values), which
keeps the file under 1 MB; load them with .float() (load_state_dict casts on its own).

Stored:
  weight.<diffusers key>                  every parameter (float16 storage, exact)
  case<i>.hidden [1, (layers+2)*rows*cols, 64]  generated frames' tokens then the condition frame's tokens
  case<i>.context [1, T, 48], case<i>.timestep [1] (the transformer's timestep, i.e. the pipeline's t/1000 = sigma)
  case<i>.layers / .rows / .cols          int64 scalars (rows, cols = latent h/2, w/2 = tokens per side)
  case<i>.out [1, (layers+2)*rows*cols, 64]  the full transformer output, every token (generated + condition)
  plain.* / plain1.*                      the same weights as plain Qwen-Image (no layer-3D RoPE, no addition
                                          embedding), one frame, no condition: a text-to-image call
"""

import sys
import zlib

import diffusers
import torch
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import load_file, save_file

CONFIG = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=48,
    axes_dims_rope=(8, 12, 12),
)
ADDITION = "time_text_embed.addition_t_embedding.weight"
# (layers, latent h, latent w, text length, timestep)
CASES = [(2, 4, 4, 5, 0.7), (3, 4, 6, 7, 0.25), (1, 8, 4, 3, 1.0)]
# plain Qwen-Image: (latent h, latent w, text length, timestep); the first is case 0's frame size
PLAINS = [("plain", 4, 4, 5, 0.7), ("plain1", 8, 4, 6, 0.4)]


def _gen(key):
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def draw(key, shape):
    z = torch.randn(shape, generator=_gen(key), dtype=torch.float32)
    if key == ADDITION:
        v = 0.5 * z  # large enough that a missing or wrong row shows
    elif len(shape) == 1 and ".norm" in "." + key:
        v = 1.0 + 0.1 * z  # RMSNorm gains (txt_norm, attn.norm_q/k/added_q/added_k)
    elif len(shape) == 2:
        v = z / shape[1] ** 0.5  # N(0, 1/fan_in)
    else:
        v = 0.02 * z  # biases
    return v.half()


def build(layered, weights):
    m = QwenImageTransformer2DModel(**CONFIG, use_additional_t_cond=layered, use_layer3d_rope=layered)
    sd = {k: v.float() for k, v in weights.items() if layered or k != ADDITION}
    m.load_state_dict(sd, strict=True)
    return m.eval()


def inputs(prefix, frames, rows, cols, text):
    hidden = torch.randn(1, frames * rows * cols, 64, generator=_gen(prefix + ".hidden"))
    context = torch.randn(1, text, 48, generator=_gen(prefix + ".context"))
    return hidden, context


def call(model, hidden, context, t, shapes, layered, mask=None):
    kw = dict(additional_t_cond=torch.zeros(1, dtype=torch.long)) if layered else {}
    return model(
        hidden_states=hidden,
        timestep=torch.tensor([t], dtype=torch.float32),
        guidance=None,
        encoder_hidden_states_mask=mask,  # the pipeline passes None when the prompt mask is all ones
        encoder_hidden_states=context,
        img_shapes=[shapes],
        attention_kwargs={},
        return_dict=False,
        **kw,
    )[0]


def run_all(weights, threads, mkldnn, mask=False):
    torch.set_num_threads(threads)
    layered, plain = build(True, weights), build(False, weights)
    outs = {}
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=mkldnn):
        for i, (layers, h, w, text, t) in enumerate(CASES):
            rows, cols = h // 2, w // 2
            hidden, context = inputs(f"case{i}", layers + 2, rows, cols, text)
            m = torch.ones(1, text, dtype=torch.long) if mask else None
            outs[f"case{i}"] = call(layered, hidden, context, t, [(1, rows, cols)] * (layers + 2), True, m)
        for name, h, w, text, t in PLAINS:
            rows, cols = h // 2, w // 2
            hidden, context = inputs(name, 1, rows, cols, text)
            m = torch.ones(1, text, dtype=torch.long) if mask else None
            outs[name] = call(plain, hidden, context, t, [(1, rows, cols)], False, m)
    return outs


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def main(path):
    probe = QwenImageTransformer2DModel(**CONFIG, use_additional_t_cond=True, use_layer3d_rope=True)
    weights = {k: draw(k, tuple(v.shape)) for k, v in probe.state_dict().items()}
    for k, v in weights.items():
        assert v.float().std() > 0 and (v != 0).any(), k
    zeros = sum(int((v == 0).sum()) for v in weights.values())
    print(
        f"diffusers {diffusers.__version__}, {len(weights)} tensors, "
        f"{sum(v.numel() for v in weights.values())} params, {zeros} exact-zero elements"
    )

    ref = run_all(weights, 1, False)
    out = {f"weight.{k}": v.contiguous() for k, v in weights.items()}
    for i, (layers, h, w, text, t) in enumerate(CASES):
        p = f"case{i}"
        hidden, context = inputs(p, layers + 2, h // 2, w // 2, text)
        out.update(
            {
                f"{p}.hidden": hidden,
                f"{p}.context": context,
                f"{p}.timestep": torch.tensor([t]),
                f"{p}.layers": torch.tensor(layers),
                f"{p}.rows": torch.tensor(h // 2),
                f"{p}.cols": torch.tensor(w // 2),
                f"{p}.out": ref[p].contiguous(),
            }
        )
    for name, h, w, text, t in PLAINS:
        hidden, context = inputs(name, 1, h // 2, w // 2, text)
        out.update(
            {
                f"{name}.hidden": hidden,
                f"{name}.context": context,
                f"{name}.timestep": torch.tensor([t]),
                f"{name}.rows": torch.tensor(h // 2),
                f"{name}.cols": torch.tensor(w // 2),
                f"{name}.out": ref[name].contiguous(),
            }
        )
    save_file(out, path, metadata={"diffusers": diffusers.__version__, "config": repr(CONFIG)})

    # reference noise and sanity
    back = load_file(path)
    assert all(torch.equal(back[f"{k}.out"], ref[k]) for k in ref)
    for label, other in (
        ("2 threads", run_all(weights, 2, False)),
        ("mkldnn on", run_all(weights, 1, True)),
        ("all-ones mask", run_all(weights, 1, False, mask=True)),
    ):
        print(label, {k: f"{rel(other[k], ref[k]):.2e}" for k in ref})
    torch.set_num_threads(1)
    # the addition embedding matters: drop it (is_rgb row 0 -> zeros) and compare
    m = build(True, weights)
    with torch.no_grad():
        m.time_text_embed.addition_t_embedding.weight.zero_()
        layers, h, w, text, t = CASES[0]
        hidden, context = inputs("case0", layers + 2, h // 2, w // 2, text)
        o = call(m, hidden, context, t, [(1, h // 2, w // 2)] * (layers + 2), True)
    print("without addition embedding, case0 rel diff", f"{rel(o, ref['case0']):.3f}")
    print({k: tuple(v.shape) for k, v in ref.items()}, {k: f"{float(v.abs().max()):.3f}" for k, v in ref.items()})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/qwen_transformer_refs.safetensors")
