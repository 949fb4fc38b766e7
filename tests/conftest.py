"""Session-wide test settings and fixtures over the tiny random-weight models of
`sdq.sdmodel.tiny` (the one copy of the builders: the benchmarks and the GPU probe use them too).

Nothing in the suite may reach a model hub.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Inductor compiles in the test process itself: its pool of compile threads would outlive the
# test that first compiles (tests/leaks.py fails that test), and on two cores buys nothing.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# Each test process (pytest-xdist runs several) keeps its own compiled-kernel cache: two processes
# writing one entry at once leave a file the other reads short.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"sdq-tests-inductor-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"))

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest-xdist's processes share the cores: each takes its part instead of all of them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
from safetensors.torch import save_file  # noqa: E402

# The builders are imported here for the tests that take them from this module.
from sdq.sdmodel.tiny import (  # noqa: E402, F401
    NEVER,
    TINY_CHECKERS,
    TINY_TEXT,
    TINY_UNET,
    TINY_VAE,
    VIT_L14_TEXT,
    build_tiny_networks,
    full_size_networks_fp16,
    ldm_checkpoint,
    save_safety_checker,
    stand_in_checkpoint,
)
from tests.services import claimed_redis_db  # noqa: E402

pytest_plugins = ["tests.s3server", "tests.leaks"]


@pytest.fixture(scope="session")
def redis_db() -> Iterator[str]:
    """A broker URL on a Redis database of this test run's own (see `claimed_redis_db`)."""
    with claimed_redis_db() as url:
        yield url


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD v1 model saved as a single-file `.safetensors` LDM checkpoint."""
    path = tmp_path_factory.mktemp("models") / "tiny-sd.safetensors"
    save_file(ldm_checkpoint(*build_tiny_networks()), str(path))
    return path


def own_direction(embeds: torch.Tensor, k: int) -> torch.Tensor:
    """The part of embedding k orthogonal to all the others: a concept pointing there has
    similarity 0 with every other image, however alike a random tower embeds them."""
    others, _ = torch.linalg.qr(torch.cat([embeds[:k], embeds[k + 1:]]).T)
    return embeds[k] - others @ (others.T @ embeds[k])


def flag_images(folder: Path, images: list, flagged: list[int]) -> None:
    """Rewrite the checker's concepts so that exactly the images at `flagged` flag: concept j
    points at image flagged[j]'s own direction with half its similarity as threshold; the
    other concepts never flag. Deterministic for these images."""
    from safetensors.torch import load_file

    from sdq.sdmodel.safety import load_safety_checker, preprocess

    checker = load_safety_checker(folder)
    with torch.inference_mode():
        pooled = checker.vision_model(preprocess(images, checker.vision_model.config.image_size)).pooler_output
        embeds = torch.nn.functional.normalize(checker.visual_projection(pooled).double())
    path = folder / "model.safetensors"
    weights = load_file(str(path))
    concepts = weights["concept_embeds"].double()
    thresholds = torch.full_like(weights["concept_embeds_weights"], NEVER, dtype=torch.float64)
    for j, k in enumerate(flagged):
        direction = own_direction(embeds, k)
        similarity = float(embeds[k] @ torch.nn.functional.normalize(direction, dim=0))
        assert similarity > 0.01, f"image {k} is too like the others to single out ({similarity})"
        concepts[j], thresholds[j] = direction, similarity / 2
    dtype = weights["concept_embeds"].dtype
    weights["concept_embeds"] = concepts.to(dtype)
    weights["concept_embeds_weights"] = thresholds.to(dtype)
    save_file(weights, str(path))


@pytest.fixture(scope="session")
def flag_all_checker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pipeline folder whose tiny checker flags every image: concept 0's threshold is -1,
    below any cosine similarity."""
    from safetensors.torch import load_file

    pipeline = tmp_path_factory.mktemp("pipeline")
    vision, projection = TINY_CHECKERS["vit-l14-scaled"]
    path = save_safety_checker(pipeline / "safety_checker", vision, projection) / "model.safetensors"
    weights = load_file(str(path))
    weights["concept_embeds_weights"][0] = -1.0
    save_file(weights, str(path))
    return pipeline
