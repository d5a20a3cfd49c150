# One image for every role: `tandem cloud serve`, `tandem edge train`, and Flower's SuperLink / SuperNodes
# (docker-compose.yml). Built from the project's own install; runs as a non-root user and writes only to its volumes
# (docker-compose.yml mounts the root file system read-only). The model is fetched here, at build time.
#   docker build -t tandem:latest .                                                        # CPU torch (as the Makefile)
#   docker build -t tandem:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   # CUDA variant
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG UID=1000
ARG GID=1000
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TANDEM_HOME=/var/lib/tandem HOME=/tmp \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# torch pinned as in the Makefile; the CPU index by default (PyPI's default wheel pulls several GB of CUDA libraries)
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY cli cli
COPY cloud cloud
COPY edge edge
COPY protocol protocol
COPY emulator emulator
COPY privacy privacy
COPY sim sim
COPY model model
COPY tasks tasks
COPY deploy/entrypoint.sh deploy/supernode.sh deploy/
# the project's own install (as `make install`, without the dev extras), then the model into TANDEM_HOME
RUN pip install . && tandem models fetch && tandem models verify \
    && groupadd -g "${GID}" tandem && useradd -u "${UID}" -g "${GID}" -M -d /tmp -s /usr/sbin/nologin tandem \
    && chmod -R a+rX /var/lib/tandem /app && chmod 0755 deploy/*.sh \
    && mkdir -p /var/lib/flwr /runs /data && chown tandem:tandem /var/lib/flwr /runs
USER tandem
ENTRYPOINT ["/app/deploy/entrypoint.sh"]
