import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "dcgraph", deadline=None, max_examples=60, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dcgraph"))

torch.set_num_threads(min(2, torch.get_num_threads()))
