"""WebUI installer hook: everything LayerDiffuse needs ships with the WebUI, except in rare setups
opencv, and psd-tools for the layered PSD files (without it the PNGs are saved as before)."""

import launch

PSD_TOOLS = "psd-tools>=1.26,<2"  # writes layered files; pure Python with numpy, Pillow and attrs

if not launch.is_installed("cv2"):
    launch.run_pip("install opencv-python-headless", "opencv for LayerDiffuse")
if not launch.is_installed("psd_tools"):
    launch.run_pip(f'install "{PSD_TOOLS}"', "psd-tools for LayerDiffuse's layered PSD files")
