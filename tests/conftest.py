import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers share the machine's cores: one thread each avoids oversubscription, which makes
    # the small sequential TTT loops many times slower.
    torch.set_num_threads(1)
