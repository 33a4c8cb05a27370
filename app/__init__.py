"""The Gradio chat app (`rg-mlx app`): streaming chat with a fixed-size state you can watch.

Importing this package turns Gradio's analytics off before Gradio itself is imported: the app
makes no network calls.
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
