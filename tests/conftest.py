import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers share the machine's cores: one thread each avoids oversubscription, which makes
    # the small sequential TTT loops many times slower.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def svd_pipeline(tmp_path_factory):
    """A tiny Stable Video Diffusion pipeline folder; returns (folder, the pipeline)."""
    from tests.models.common import tiny_svd_pipeline

    folder = tmp_path_factory.mktemp("svd")
    return folder, tiny_svd_pipeline(folder)
