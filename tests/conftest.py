import os
# No test may download anything: a stray hub access fails fast instead of hanging.
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"): os.environ[var] = "1"
