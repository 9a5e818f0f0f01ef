"""lib_layerdiffuse.qwen_layered.sample_layers against the reference Layered pipeline's denoising loop.

tests/data/qwen_layered_loop_refs.safetensors holds what diffusers 0.42.1's QwenImageLayeredPipeline loop
(its loop lines with its own packing, retrieve_timesteps and FlowMatchEulerDiscreteScheduler, run in a side
environment outside the repository) produced when its transformer was replaced by a fixed linear function
of the inputs, whose weights are saved with the numbers. The same function drives the loop under test here,
so every difference is the loop's: the appended condition tokens, the cut back to the generated tokens, the
timestep, true CFG and its normalisation, the Euler step. The "meta" entry records the cases.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_layerdiffuse import qwen_layered as ql
from lib_layerdiffuse.errors import SettingsError
from tests.tolerance import ROUNDING

REFS_PATH = Path(__file__).parent / "data" / "qwen_layered_loop_refs.safetensors"


@pytest.fixture(scope="module")
def refs():
    return load_file(str(REFS_PATH))


@pytest.fixture(scope="module")
def cases():
    with safe_open(str(REFS_PATH), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    assert meta["diffusers"] == "0.42.1"
    return meta["cases"]


def _linear_model(refs, calls=None):
    """The reference run's stand-in transformer: every token mixes with all tokens, the timestep and the text."""

    def model(hidden_states, timestep, encoder_hidden_states):
        if calls is not None:
            calls.append((tuple(hidden_states.shape), timestep.clone()))
        return (
            hidden_states @ refs["A"]
            + hidden_states.mean(dim=1, keepdim=True) @ refs["M"]
            + timestep[:, None, None] * refs["b"]
            + encoder_hidden_states.mean(dim=1, keepdim=True) @ refs["E"]
        )

    return model


def _run(refs, name, case, model=None, sigmas=None, **overrides):
    steps, scale, has_neg, normalize = case
    kwargs = dict(
        cond={"encoder_hidden_states": refs["prompt_embeds"]},
        uncond={"encoder_hidden_states": refs["negative_prompt_embeds"]} if has_neg else None,
        true_cfg_scale=scale,
        normalize=normalize,
    )
    kwargs.update(overrides)
    sigmas = refs[f"{name}_sigmas"] if sigmas is None else sigmas
    return ql.sample_layers(model or _linear_model(refs), refs["noise"], refs["condition"], sigmas, **kwargs)


def _rel(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("name", ["plain", "cfg", "cfgnorm", "cfgnorm2"])
def test_loop_matches_reference(refs, cases, name):
    out = _run(refs, name, cases[name])
    assert out.shape == refs[f"{name}_out"].shape
    assert _rel(out, refs[f"{name}_out"]) < ROUNDING


@pytest.mark.parametrize("name", ["plain", "cfgnorm"])
def test_flow_sigmas_drive_the_same_loop(refs, cases, name):
    # the host builds the schedule with flow_sigmas from the condition's token count
    sigmas = ql.flow_sigmas(cases[name][0], refs["condition"].shape[1])
    assert _rel(_run(refs, name, cases[name], sigmas=sigmas), refs[f"{name}_out"]) < ROUNDING


def test_model_sees_condition_appended_and_sigma_timesteps(refs, cases):
    calls = []
    _run(refs, "cfg", cases["cfg"], model=_linear_model(refs, calls))
    n = refs["noise"].shape[1] + refs["condition"].shape[1]
    sigmas = refs["cfg_sigmas"]
    assert len(calls) == 2 * cases["cfg"][0]  # cond and uncond per step
    assert all(shape == (1, n, 64) for shape, _ in calls)
    for i, (_, t) in enumerate(calls):
        assert torch.allclose(t, sigmas[i // 2 : i // 2 + 1], rtol=0, atol=1e-7)


def _perturbed(refs, name, case, model):
    return _rel(_run(refs, name, case, model=model), refs[f"{name}_out"])


def test_perturbations_fail(refs, cases):
    base = _linear_model(refs)
    n_gen = refs["noise"].shape[1]
    # the condition tokens before the generated ones (the cut then keeps the wrong tokens)
    swapped = lambda x, t, **kw: base(torch.cat([x[:, n_gen:], x[:, :n_gen]], 1), t, **kw)  # noqa: E731
    assert _perturbed(refs, "cfgnorm", cases["cfgnorm"], swapped) > 1e-2
    # no condition tokens at all (the model's mix over tokens changes)
    dropped = lambda x, t, **kw: base(torch.cat([x[:, :n_gen], torch.zeros_like(x[:, n_gen:])], 1), t, **kw)  # noqa: E731
    assert _perturbed(refs, "cfgnorm", cases["cfgnorm"], dropped) > 1e-2
    # the timestep in the scheduler's 0..1000 scale instead of sigma
    thousand = lambda x, t, **kw: base(x, t * 1000, **kw)  # noqa: E731
    assert _perturbed(refs, "plain", cases["plain"], thousand) > 1e-2
    # normalisation off where the reference had it on, and on where it had it off
    assert _rel(_run(refs, "cfgnorm", cases["cfgnorm"], normalize=False), refs["cfgnorm_out"]) > 1e-2
    assert _rel(_run(refs, "cfg", cases["cfg"], normalize=True), refs["cfg_out"]) > 1e-2
    # CFG dropped, and the guidance of the other branch
    assert _rel(_run(refs, "cfg", cases["cfg"], uncond=None), refs["cfg_out"]) > 1e-2
    assert _rel(_run(refs, "cfg", cases["cfg"], true_cfg_scale=2.0), refs["cfg_out"]) > 1e-2
    # a wrong step sign: the same schedule reversed
    assert _rel(_run(refs, "plain", cases["plain"], sigmas=refs["plain_sigmas"].flip(0)), refs["plain_out"]) > 1e-2


def test_negative_branch_ignored_at_scale_one(refs, cases):
    # as the pipeline: true CFG only when the scale is above 1 and a negative branch is given
    steps = cases["plain"][0]
    calls = []
    out = _run(refs, "plain", [steps, 1.0, True, True], model=_linear_model(refs, calls))
    assert len(calls) == steps
    assert _rel(out, refs["plain_out"]) < ROUNDING


def test_bad_inputs_refused(refs, cases):
    with pytest.raises(SettingsError, match="sample_layers"):
        _run(refs, "plain", cases["plain"], sigmas=torch.tensor([1.0]))
    with pytest.raises(SettingsError, match="sample_layers"):
        ql.sample_layers(_linear_model(refs), refs["noise"], refs["condition"][..., :32], refs["plain_sigmas"], cond={})
    bad = lambda x, t, **kw: torch.zeros(1, 3, 64)  # noqa: E731
    with pytest.raises(SettingsError, match="sample_layers"):
        _run(refs, "plain", cases["plain"], model=bad)
