import os
# No test may download anything: a stray hub access fails fast instead of hanging.
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"): os.environ[var] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests that start servers or browsers (run in CI by `make test`)")
