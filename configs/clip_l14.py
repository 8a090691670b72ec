"""Real scale: CLIP ViT-L/14 at 224px (Radford et al. 2021), global batch 32k.

Built on configs/clip_b16.py (softmax loss, t = 1/0.07, CLIP's tokenizer and causal text
tower pooled at EOS, same data and optimiser); CLIP's L/14 shapes and layout: image tower
width 1024, depth 24, 16 heads, MLP 4096, 14 px patches, a class token with a layer norm
before the blocks and no patch bias (as open_clip's ViT-L-14, see vlm_jax/convert/open_clip.py);
text tower width 768, depth 12, 12 heads; a 768-d shared embedding. 428M params (image 304M,
text 124M).

Sized for pods: bf16, remat + scan, the chunked (ring) softmax loss, the Pallas flash kernel,
and FSDP over 16 chips of a slice (`mesh.shape=(-1, 16, 1)`; the rest data parallel, including
across slices).
"""

from pathlib import Path

from vlm_jax.config import load_config


def get_config(arg=None):
    c = load_config(str(Path(__file__).with_name("clip_b16.py")))
    c.model.embed_dim = 768
    c.model.attention_impl = "pallas"
    c.model.image.update(
        variant="L/14", width=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=14
    )
    c.model.image.update(pool="cls", ln_pre=True, patch_bias=False, head_bias=False)
    c.model.text.update(width=768, depth=12, num_heads=12, mlp_dim=3072, head_bias=False)
    c.mesh.shape = (-1, 16, 1)
    c.eval.batch_size = 2048
    return c
