#!/bin/bash
# Prepare a GPU-machine check (run here, on the CPU machine): wheels the GPU image lacks (.whl/)
# and a fitted job with a small SMPL-layout body (.gpu/), since the Anny cache (0.8 GB) cannot
# travel. Then run tests/benchmarks/gpu_session.sh there, carrying .whl and .gpu.
set -eu
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
mkdir -p .whl .gpu
for w in diffusers==0.42.1 nerfacc==0.5.3 smplx==0.1.28 trimesh==5.2.0 PyMCubes==0.1.6 xatlas==0.0.11 \
         fast-simplification==0.2.0 importlib-metadata; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$w"
done
export PYTHONPATH=. HF_HUB_OFFLINE=1 ZEROAVATAR_ANNY_CACHE=${ZEROAVATAR_ANNY_CACHE:-.cache/anny}
$PY -c "
from pathlib import Path
from tests.engine.body.synthetic_smpl import write_model_folder
write_model_folder(Path('/tmp/za_smpl'))"
mkdir -p .gpu/za_smpl && cp /tmp/za_smpl/SMPL_NEUTRAL.npz .gpu/za_smpl/
PHOTO=${1:-bench_output/gt/standing_f/photo.png}
$PY -m zeroavatar_blender.engine fit "$PHOTO" --out .gpu/job --body smpl --body-model-path /tmp/za_smpl --progress lines
cp tests/benchmarks/gpu_session.sh .gpu/run.sh
du -sh .whl .gpu
