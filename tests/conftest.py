import pytest

import tiny


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """The tiny embedded base, built once per session (the real builder, fewer SFT steps)."""
    path = str(tmp_path_factory.mktemp("cache") / "tiny-base-v1")
    tiny.build_base(path, sft_steps=150, log=lambda m: None)
    return path
