# The sdq worker image: a CUDA PyTorch base, sdq installed on top.
#
# transformers 5 switches its PyTorch support off below torch 2.6, so the base must carry at
# least that (tests/worker/test_image.py reads this tag and checks it against the pinned
# transformers). pip would keep any torch that satisfies sdq's own `torch>=2.1`, but another
# dependency could still ask for a different build; the constraint written below holds torch at
# exactly the base's CUDA build, and the build fails rather than replace it.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

WORKDIR /src
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY core core
COPY sdmodel sdmodel
COPY images images
COPY jobs jobs
COPY worker worker
COPY cli cli
COPY db db
COPY migrations migrations
# The install holds torch at the base's build and transformers at the version sdq is tested
# against (constraints.txt's line: its torch line is the CPU build of the test machines). After
# it: torch is still the base's, and transformers builds a (tiny) CLIP text model, which it
# refuses to do when it has disabled PyTorch.
RUN set -eu; \
    base_torch="$(python -c 'from importlib.metadata import version; print(version("torch"))')"; \
    { printf 'torch==%s\n' "$base_torch"; grep -E '^transformers==' constraints.txt; } > /tmp/constraints.txt; \
    pip install --no-cache-dir --constraint /tmp/constraints.txt .; \
    test "$(python -c 'from importlib.metadata import version; print(version("torch"))')" = "$base_torch"; \
    python -c 'import transformers as t; t.CLIPTextModel(t.CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4))'; \
    rm -rf /src /tmp/constraints.txt

WORKDIR /data
ENV SDQ_HOME=/data PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 1000 sdq && chown sdq /data
USER sdq

# SIGTERM reaches `sdq worker`, which lets each Celery worker finish its batch. One worker
# process per GPU the container sees; batch sizes from each GPU's free memory (SDQ_BATCH_SIZE
# unset).
STOPSIGNAL SIGTERM
CMD ["sdq", "worker", "--gpus", "all", "--", "--loglevel", "INFO"]
