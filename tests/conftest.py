import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: beside another CPU-heavy process on 2 cores, the
# spinning second thread of every op made the reference tests 2-8x slower. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from weightgen import DATA, make_state_dict, manifest_shapes  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# LAYERDIFFUSE_TEST_NO_MKLDNN=1 turns oneDNN off for the session: convolutions and matmuls then run
# ATen's own kernels, which round differently, as another CPU's do. .ci/run reruns the tests
# marked "reference" this way and with ATEN_CPU_CAPABILITY=default (tests/tolerance.py).
NO_MKLDNN = os.environ.get("LAYERDIFFUSE_TEST_NO_MKLDNN", "").strip() not in ("", "0")


def pytest_report_header(config):
    onednn = "off" if NO_MKLDNN else ("on" if torch.backends.mkldnn.is_available() else "not built")
    return (
        f"torch {torch.__version__}: CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"oneDNN {onednn}, {torch.get_num_threads()} threads"
    )


@pytest.fixture(scope="session", autouse=True)
def _mkldnn_switch():
    if not NO_MKLDNN:
        yield
        return
    before = torch.backends.mkldnn.set_flags(False)[0]  # this flag only: flags() also sets TF32 and warns
    try:
        yield
    finally:
        torch.backends.mkldnn.set_flags(before)


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("layer_model")


@pytest.fixture(scope="session")
def decoder_state():
    return make_state_dict(manifest_shapes("vae_transparent_decoder"), seed=1)


@pytest.fixture(scope="session")
def encoder_state():
    return make_state_dict(manifest_shapes("vae_transparent_encoder"), seed=2)


@pytest.fixture(scope="session")
def decoder_file(weights_dir, decoder_state):
    """A full-size decoder file in fp16, the official layout (built once per session)."""
    path = weights_dir / "vae_transparent_decoder.safetensors"
    save_file({k: v.half() for k, v in decoder_state.items()}, str(path))
    return path


@pytest.fixture(scope="session")
def encoder_file(weights_dir, encoder_state):
    path = weights_dir / "vae_transparent_encoder.safetensors"
    save_file(encoder_state, str(path))
    return path


@pytest.fixture(scope="session")
def decoder(decoder_state):
    from lib_layerdiffuse.vae import TransparentVAEDecoder

    m = TransparentVAEDecoder()
    m.load_state_dict(decoder_state, strict=True)
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def encoder(encoder_state):
    from lib_layerdiffuse.vae import TransparentVAEEncoder

    m = TransparentVAEEncoder()
    m.load_state_dict(encoder_state, strict=True)
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def reference():
    """Numbers produced by the official implementation on the weights of weightgen (fp32, CPU)."""
    from safetensors.torch import load_file

    return load_file(str(DATA / "official_reference.safetensors"))
