#!/usr/bin/env bash
# Downloads into .gpu_wheels/ the wheels that a lent GPU machine lacks, for its Python 3.12 on
# linux x86_64, so that benchmarks/gpu_session.sh can install them there without a package index:
#
#   bash benchmarks/gpu_wheels.sh      # then carry .gpu_wheels with the working tree
#
# Prints each wheel and the total size (about 12 MiB; the carry limit is 64 MiB).
#
# That machine has JAX (CUDA), flax, optax, orbax-checkpoint, numpy and sentencepiece, and with
# them what they depend on (absl-py, etils[epath], PyYAML, protobuf, msgpack, ...). What pretrax
# needs on top at import time: grain (with array_record, cloudpickle, portpicker) and
# ml_collections; then zstandard and tensorboardX, small, imported only for .zst corpora and
# TensorBoard. pyarrow (~40 MB, Parquet corpora only) and matplotlib (sweep plots only) are
# imported lazily and left out. --no-deps keeps pip from pulling jax, jaxlib or CUDA wheels in;
# the few small dependencies of these packages are named instead, so that one that turns out to
# be missing there can still be installed. Versions are constraints.txt's, the ones tested here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
WHEELS=.gpu_wheels

rm -rf "$WHEELS"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -c constraints.txt -d "$WHEELS" \
    grain array_record cloudpickle portpicker ml_collections zstandard tensorboardX \
    absl-py etils fsspec zipp typing_extensions PyYAML protobuf packaging psutil filelock

ls -1 "$WHEELS"
du -sh "$WHEELS" | awk '{print "total: " $1}'
