# One image for both roles: `tandem cloud serve` and `tandem edge train` (see docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TANDEM_HOME=/var/lib/tandem
# The CPU build of torch; the default wheel from PyPI pulls several GB of CUDA libraries.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
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
RUN pip install . && tandem models fetch
ENTRYPOINT ["tandem"]
