"""WebUI installer hook: everything LayerDiffuse needs ships with the WebUI, except in rare setups opencv."""

import launch

if not launch.is_installed("cv2"):
    launch.run_pip("install opencv-python-headless", "opencv for LayerDiffuse")
