"""Architecture name (config.json `architectures[0]`) -> model class."""

from __future__ import annotations

from glmv.config import ModelConfig
from glmv.errors import UnsupportedModelError
from glmv.models.glm4v import Glm4vForConditionalGeneration
from glmv.models.glm4v_moe import Glm4vMoeForConditionalGeneration

MODEL_REGISTRY: dict[str, type[Glm4vForConditionalGeneration]] = {
    "Glm4vForConditionalGeneration": Glm4vForConditionalGeneration,
    "Glm4vMoeForConditionalGeneration": Glm4vMoeForConditionalGeneration,
}


def model_class(cfg: ModelConfig) -> type[Glm4vForConditionalGeneration]:
    try:
        return MODEL_REGISTRY[cfg.architecture]
    except KeyError:
        raise UnsupportedModelError(f"no model registered for {cfg.architecture!r}") from None
