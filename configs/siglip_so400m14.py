"""Real scale: SigLIP So400m/14 (shape-optimised ViT, Alabdulmohsin et al. 2023), batch 32k.

Built on configs/siglip_b16.py (same data, loss, optimiser and batch). The sizes are
big_vision's "So400m/14" (vit.VARIANTS: width 1152, depth 27, MLP 4304, 16 heads) for both
towers, as in the released SigLIP So400m checkpoints: the image tower pools with a MAP head
and has no projection (big_vision `out_dim=(None, 1152)`), the text tower projects to 1152.
Arg: the image side, "224" (default; pretraining, 16x16 patches) or "378" for the released
"patch14-384" stage: its 384 px input gives 27x27 = 729 patches, the last 6 px dropped by the
stride-14 patch conv, which is a 378 px image here (image_size must be a multiple of the patch;
vlm_jax/convert/big_vision.py reads such a checkpoint as 378), e.g. `...so400m14.py:378`.

Sized for pods: bf16, remat + scan, chunked sigmoid loss, the Pallas flash kernel, and FSDP
over 16 chips of a slice (`mesh.shape=(-1, 16, 1)`: params and optimizer state split 16 ways,
the rest data parallel, including across slices). 877M params (image 428M, text 450M):
replicated, their float32 AdamW state alone (10.5 GB) would leave little room for
activations on a 16 GiB v5e chip.
"""

from pathlib import Path

from vlm_jax.config import load_config

SIZES = dict(width=1152, depth=27, num_heads=16, mlp_dim=4304)  # vit.VARIANTS["So400m"]
IMAGE_SIZES = ("224", "378")


def get_config(arg=None):
    size = arg or "224"
    if size not in IMAGE_SIZES:
        raise ValueError(f"image size {size!r} is not one of: {', '.join(IMAGE_SIZES)}")
    c = load_config(str(Path(__file__).with_name("siglip_b16.py")))
    c.data.image_size = int(size)
    c.model.embed_dim = SIZES["width"]
    c.model.attention_impl = "pallas"
    c.model.image.update(variant="So400m/14", image_size=int(size), head=False, **SIZES)
    c.model.image.patch_size = 14
    c.model.text.update(**SIZES)
    c.mesh.shape = (-1, 16, 1)
    c.eval.batch_size = 2048
    return c
