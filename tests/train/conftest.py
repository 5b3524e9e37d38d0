"""The training tests' shared tiny SD1 model folder (built once per session)."""

import pytest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from imglora.models.tiny import tiny_sd_pipeline

    d = tmp_path_factory.mktemp("model")
    tiny_sd_pipeline(d / "tok").save_pretrained(d / "sd1")
    return d / "sd1"
