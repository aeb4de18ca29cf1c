# The mri-assets image for Kubernetes (deploy/helm/values.yaml): the code server, the run pods and
# the step pods all run it. It installs the project as `make install` does (README): torch pinned
# first, from the index of the wanted build, then the package with an extra. A test keeps these
# steps and the Makefile's in step (mri_assets_tests/test_kubernetes.py).
#
#   docker build -t mri-assets:cpu .
#   docker build --build-arg TORCH_INDEX=cu128 -t mri-assets:cuda .
#
# TORCH_INDEX is a folder of https://download.pytorch.org/whl/: `cpu`, or the CUDA tag for the
# cluster's driver (cu126, cu128, ...). The CUDA wheels bring their own CUDA libraries, so both
# variants start from the same slim Python; a GPU node's NVIDIA device plugin supplies the driver.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    MRI_HOME=/var/lib/mri

WORKDIR /opt/mri-assets

# Torch first and pinned (as in the Makefile): the package's own `torch==` pin is then already met
# by the build chosen here, and pip does not fetch another.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}"

COPY pyproject.toml setup.py README.md ./
COPY mri_assets ./mri_assets
RUN pip install -e ".[k8s]"

COPY workspace.yaml dagster.yaml dagster.postgres.yaml ./

# Not root: the pods run as this user (uid 1000); MRI_HOME is a mounted volume on a cluster.
RUN useradd --uid 1000 --create-home mri \
    && mkdir -p "${DAGSTER_HOME}" "${MRI_HOME}" \
    && chown -R mri "${DAGSTER_HOME}" "${MRI_HOME}"
USER 1000

EXPOSE 3030
CMD ["dagster", "api", "grpc", "-m", "mri_assets.kubernetes", "-h", "0.0.0.0", "-p", "3030"]
