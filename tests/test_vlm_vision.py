"""The VLM's vision tower is the two-tower's ViT returning patch tokens: every model.image key
means the same in both, and the contrastive tower's params drive it unchanged."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.config import load_config
from vlm_jax.models.two_tower import build_vit
from vlm_jax.models.vlm import vision_tower

# Every key the contrastive tower honours, set away from its default.
IMAGE_KEYS = dict(
    activation="quick_gelu",
    ln_eps=1e-5,
    ln_pre=True,
    patch_bias=False,
    input_mean=(0.48, 0.46, 0.41),
    input_std=(0.27, 0.26, 0.28),
    posemb="sincos2d",
    stem="patch",
)


def _vlm_model_config(**image):
    config = load_config("configs/vlm_shapes.py")
    config.model.image.update(image)
    return config.model


def _images(batch=2):
    return jax.random.uniform(jax.random.key(3), (batch, 32, 32, 3), minval=-1, maxval=1)


@pytest.mark.parametrize("pool", ["gap", "cls"])
def test_patch_tokens_match_the_contrastive_tower_on_its_params(pool):
    """The contrastive `img` tower (head=False) initialises the VLM's tower; the VLM's patch
    tokens then reproduce the contrastive features: their mean is the "gap" embedding, and
    with "cls" the cls token (kept in the encoder, dropped from the output) is read by them."""
    vlm_model = _vlm_model_config(**IMAGE_KEYS, pool=pool)
    contrastive = vlm_model.copy_and_resolve_references()
    contrastive.embed_dim = 8
    contrastive.image.head = False
    img = build_vit(contrastive)
    images = _images()
    params = nn.unbox(img.init(jax.random.key(0), images)["params"])

    vision = vision_tower(vlm_model)
    vision_params = nn.unbox(vision.init(jax.random.key(1), images)["params"])
    assert set(vision_params) == set(params) - {"map"}  # same names; no pooling head
    tokens = vision.apply({"params": params}, images)  # the contrastive params, as loaded
    assert tokens.shape == (2, (32 // vlm_model.image.patch_size) ** 2, vlm_model.image.width)
    if pool == "gap":
        np.testing.assert_allclose(tokens.mean(1), img.apply({"params": params}, images), atol=1e-5)
    else:
        moved = dict(params, cls=jax.random.normal(jax.random.key(2), params["cls"].shape))
        assert not np.allclose(tokens, vision.apply({"params": moved}, images))


@pytest.mark.parametrize(
    "key, value", list((IMAGE_KEYS | dict(ln_eps=1e-2, stem="conv", dropout=0.5)).items())
)
def test_every_image_key_changes_the_tower(key, value):
    """Was: the VLM's copy of ViT ignored dropout, activation, ln_eps, ln_pre, patch_bias,
    input_mean/std: each key now changes the params or the patch tokens (in training)."""
    images = _images()
    default = vision_tower(_vlm_model_config())
    changed = vision_tower(_vlm_model_config(**{key: value}))
    variables = default.init(jax.random.key(0), images)
    changed_vars = changed.init(jax.random.key(0), images)
    if jax.tree.structure(variables) != jax.tree.structure(changed_vars):
        return  # a param was added or removed (ln_pre, patch_bias, posemb, stem)
    rngs = {"dropout": jax.random.key(1)}
    a = default.apply(variables, images, train=True, rngs=rngs)
    b = changed.apply(variables, images, train=True, rngs=rngs)
    assert not np.array_equal(a, b), key


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("pool", "bogus", "model.image.pool='bogus' is not one of: cls, gap, map"),
        ("stem", "cnov", "model.image.stem='cnov' is not one of: patch, conv"),
        ("num_heads", 5, "model.image: width=48 is not divisible by num_heads=5"),
        ("head", False, "model.image.head is not used by the VLM's vision tower"),
        ("widht", 8, "model.image.widht is not a known key"),
    ],
)
def test_invalid_or_unused_image_keys_fail(key, value, message):
    with pytest.raises(ValueError, match=message):
        vision_tower(_vlm_model_config(**{key: value}))


def test_param_names_are_the_vit_names():
    """VLM checkpoints from before the ViT reuse (PatchTokens: embedding/posemb/encoder) still
    load with pool "map" or "gap" (the shipped configs); pool "cls" now adds a cls token."""
    vision = vision_tower(_vlm_model_config())
    params = jax.eval_shape(lambda: vision.init(jax.random.key(0), _images(1)))["params"]
    assert set(params) == {"embedding", "posemb", "encoder"}
    assert jnp.shape(params["posemb"].value) == (1, 64, 48)
