"""VQA + captioning VLM on the embedded shapes world (base of experiments/ablate_connectors.py).

python -m vlm_jax.train --config configs/vlm_shapes.py --workdir runs/vlm
python -m vlm_jax.generate --workdir runs/vlm --image img.png --prompt "how many circles are there?"

Arg (optional) picks a training recipe: "stage1" (connector only; vision and LM frozen),
"stage2" (connector + LM; vision frozen), "full" (default: everything trained). Stage 1/2
expect init.vision_checkpoint / init.lm_checkpoint to point at a contrastive / "lm" run.
"""

import ml_collections

from vlm_jax.data.pipeline import default_data_config
from vlm_jax.data.tokenizers import SPECIALS
from vlm_jax.data.vqa import IMAGE_PLACEHOLDER, QUESTION_TYPES, vocabulary
from vlm_jax.defaults import base_config

# optim.freeze regexes over param paths; stage 1 trains the connector and, with
# cross-attention fusion, the gated xattn blocks (lm/xattn_*), as Flamingo does.
RECIPES = {"full": (), "stage2": ("vision/.*",), "stage1": ("vision/.*", "lm/(?!xattn_).*")}


def get_config(arg=None):
    c = base_config()
    c.task = "vlm"
    c.seed = 0

    c.data = default_data_config()
    c.data.source = "shapes_vqa"
    c.data.flip = False  # a mirrored image would falsify left/right answers
    c.data.question_types = QUESTION_TYPES

    words = vocabulary()
    c.tokenizer = ml_collections.ConfigDict(dict(name="words", max_len=24, words=tuple(words)))

    c.model = ml_collections.ConfigDict()
    c.model.name = "vlm"
    c.model.dtype = "float32"
    c.model.attention_impl = "auto"
    c.model.remat = False
    c.model.scan = False
    c.model.fusion = "early"  # "early" | "cross_attention" | "none" (text-only baseline)
    c.model.cross_attention_every = 1  # cross_attention: a gated xattn block every k layers
    c.model.image_token_id = len(SPECIALS) + words.index(IMAGE_PLACEHOLDER)
    c.model.pad_id = SPECIALS.index("<pad>")  # the words tokenizer's; must match it
    c.model.image = ml_collections.ConfigDict(
        dict(
            variant=None,
            width=48,
            depth=2,
            num_heads=4,
            mlp_dim=96,
            patch_size=4,
            image_size=32,
            posemb="learn",
            stem="patch",  # "conv" to load a contrastive run trained with the conv stem
            pool="map",  # the VLM reads the patch tokens; only "cls" matters (a cls token)
            dropout=0.0,
        )
    )
    # linear | mlp | pool | perceiver | qformer; the section holds the named connector's keys
    # (its schema has the defaults): e.g. --config.model.connector.name=perceiver
    # --config.model.connector.num_tokens=16 (see experiments/ablate_connectors.py).
    c.model.connector = ml_collections.ConfigDict(dict(name="mlp"))
    c.model.lm = ml_collections.ConfigDict(
        dict(
            vocab_size=128,
            width=96,
            depth=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=24,
            mlp_dim=192,
            rope_theta=10_000.0,
            tie_embeddings=True,
            dropout=0.0,
        )
    )

    c.init.vision_checkpoint = ""  # contrastive run whose image tower initialises `vision`
    c.init.vision_key = "img"  # the image tower's name in that run's params
    c.init.lm_checkpoint = ""  # "lm" run (configs/lm_shapes.py) whose decoder initialises `lm`

    c.train.batch_size = 32
    c.train.total_steps = 500
    c.train.log_every = 50
    c.train.checkpoint_every = 250
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 1e-4
    recipe = arg or "full"
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r} is not one of: {', '.join(RECIPES)}")
    c.optim.freeze = RECIPES[recipe]

    c.eval.tasks = ("vqa", "caption")  # the vlm task's evaluators (vlm_jax/evaluate/vqa.py)
    c.eval.batch_size = 128
    c.eval.num_examples = 140  # held-out questions, 20 per type
    c.eval.max_new_tokens = 12
    c.eval.split = "val"
    return c
