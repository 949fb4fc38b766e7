# The sdq worker image: CUDA PyTorch base, sdq installed on top (torch from the base is kept).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY sdmodel sdmodel
COPY worker worker
COPY cli cli
COPY db db
COPY migrations migrations
RUN pip install --no-cache-dir . && rm -rf /src

WORKDIR /data
ENV SDQ_HOME=/data PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 1000 sdq && chown sdq /data
USER sdq

# SIGTERM reaches `sdq worker`, which lets each Celery worker finish its batch.
STOPSIGNAL SIGTERM
CMD ["sdq", "worker", "--", "--loglevel", "INFO"]
