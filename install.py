"""WebUI installer hook: everything LayerDiffuse needs ships with the WebUI, except in rare setups
opencv, and psd-tools for the layered PSD files (without it the PNGs are saved as before)."""

import importlib.metadata

import launch

PSD_TOOLS = "psd-tools>=1.26,<2"  # writes layered files; pure Python over numpy, Pillow and attrs


def _pillow_at_least(version: tuple[int, int]) -> bool:
    try:
        found = importlib.metadata.version("Pillow")
        return tuple(int(x) for x in found.split(".")[:2]) >= version
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False


if not launch.is_installed("cv2"):
    launch.run_pip("install opencv-python-headless", "opencv for LayerDiffuse")
if not launch.is_installed("psd_tools"):
    if _pillow_at_least((10, 3)):
        launch.run_pip(f'install "{PSD_TOOLS}"', "psd-tools for LayerDiffuse's layered PSD files")
    else:
        # A1111 1.10 pins Pillow 9.5, older than psd-tools asks for: keep the WebUI's Pillow (the
        # extension checks at first use that psd-tools writes a PSD with it, lib_layerdiffuse/psd.py)
        launch.run_pip(f'install "attrs>=23" "{PSD_TOOLS}" --no-deps', "psd-tools for LayerDiffuse (keeping Pillow)")
