"""The diffusion models kept between jobs of one process (a batch): the same weights and
settings take them as they are; other settings, other weights or a weight file changed on disk
load again, and only one set is ever kept."""

from __future__ import annotations

import os

import pytest

from tests.engine.guidance import tiny_models as tm
from zeroavatar_blender.engine.guidance import pipeline_cache
from zeroavatar_blender.engine.guidance import weights as W
from zeroavatar_blender.engine.guidance.sds import DepthControlledSDS, SDSConfig


@pytest.fixture()
def layouts(tmp_path):
    pipeline_cache.forget()
    yield tm.make_layouts(tmp_path)
    pipeline_cache.forget()


def test_the_next_job_takes_the_kept_models_and_changes_load_again(layouts, tmp_path):
    found = W.find_guidance_weights(str(layouts.sd_dir), str(layouts.controlnet_dir))
    cfg = SDSConfig(resolution=tm.RESOLUTION)
    first = DepthControlledSDS.from_weights(found, "cpu", cfg)
    again = DepthControlledSDS.from_weights(found, "cpu", cfg)
    assert not first.reused_models and again.reused_models
    assert again.pipe is first.pipe and again is not first  # its own SDS state (noise, graph)

    nhwc = DepthControlledSDS.from_weights(found, "cpu", SDSConfig(resolution=tm.RESOLUTION, channels_last=True))
    assert not nhwc.reused_models and nhwc.pipe is not first.pipe
    assert len(pipeline_cache._KEPT) == 1  # the old set went

    plain = DepthControlledSDS.from_weights(found, "cpu", cfg)
    assert not plain.reused_models
    unet = next((layouts.sd_dir / "unet").glob("*.safetensors"))
    st = unet.stat()
    os.utime(unet, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # rewritten since
    assert not DepthControlledSDS.from_weights(found, "cpu", cfg).reused_models

    other = tmp_path / "other"
    other_layouts = tm.make_layouts(other, seed=1)
    found_other = W.find_guidance_weights(str(other_layouts.sd_dir), str(other_layouts.controlnet_dir))
    assert not DepthControlledSDS.from_weights(found_other, "cpu", cfg).reused_models


def test_a_load_that_fails_keeps_nothing(layouts, tmp_path):
    found = W.find_guidance_weights(str(layouts.sd_dir), str(layouts.controlnet_dir))
    cfg = SDSConfig(resolution=tm.RESOLUTION)
    DepthControlledSDS.from_weights(found, "cpu", cfg)
    unet = next((layouts.sd_dir / "unet").glob("*.safetensors"))
    unet.write_bytes(unet.read_bytes()[:100])
    with pytest.raises(Exception, match="UNet"):
        DepthControlledSDS.from_weights(found, "cpu", cfg)
    assert pipeline_cache._KEPT == {}
