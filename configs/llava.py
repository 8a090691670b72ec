"""LLaVA-1.5-7B-shaped VLM: an imported CLIP ViT-L/14-336 tower, a 2-layer MLP connector and an
imported 7B Llama-family LM (Vicuna-7B v1.5 / Llama-2-7B shapes), sized for pods.

Recipes by arg, as LLaVA trains (Liu et al. 2023, "Improved baselines"):
  stage1  connector only (vision and LM frozen), batch 256, lr 1e-3       (LLaVA's pretrain)
  stage2  connector + LM (vision frozen), batch 128, lr 2e-5 (default)    (LLaVA's finetune)
  lora    connector + LoRA r=128, alpha=256 on the LM's attention and MLP (vision and LM
          frozen), batch 128, lr 2e-4                                      (LLaVA's LoRA)

The towers come from released checkpoints, converted once (nothing is downloaded):

    python -m vlm_jax.convert --from hf --src /ckpt/vicuna-7b-v1.5 --out runs/vicuna
    python -m vlm_jax.convert --from open_clip --src /ckpt/clip-vit-l14-336 --out runs/clip
    python -m vlm_jax.train --config configs/llava.py:stage2 --workdir runs/llava \\
        --config.init.lm_checkpoint=runs/vicuna --config.init.vision_checkpoint=runs/clip \\
        --config.tokenizer.path=runs/vicuna/tokenizer --config.data.path=/data/llava_folder

LLaVA's own data (llava_v1_5_mix665k.json, blip_laion_cc_sbu_558k.json) reads directly as
conversations (vlm_jax/data/conversations.py; loss on the assistant turns only, Vicuna's v1
template, several conversations per row with data.packing):

        --config.data.source=llava_json --config.data.path=/data/llava_v1_5_mix665k.json \
        --config.data.image_root=/data/llava_images --config.data.chat_template=llava_v1

(LLaVA's stage 1 uses its "plain" format instead, the image then the caption; with llava_v1
stage 1 also sees the system prompt and the question. Held-out VQA from a file:
--config.eval.tasks="('vqa_file','text_perplexity')" --config.eval.vqa_path=... and the
text-only guardrail's --config.eval.text_path=...)

The LM's tokenizer is the release's (tokenizer.name="hf", copied into the converted run);
`<image>` is added after its 32,000 ids, so `model.image_token_id` is 32000 for Llama-2 /
Vicuna tokenizers (the task checks it against the tokenizer). The LM's embedding has 32,064 rows:
init grows the release's 32,000 by mean rows (the added token, and padding that keeps the vocab
dim divisible by the tensor axis). Images: 336 px, 14 px patches = 576 visual tokens per image;
text up to 2,048 - 576 tokens.

Mesh (1, 8, 4) per 32 chips: FSDP over 8 (params, gradients and Adam state split on their model
dim), tensor parallel over 4 (heads, MLP, vocab); bf16, remat + scan. What a step needs per chip
on a topology: `python -m vlm_jax.compile --config configs/llava.py:stage2 --topology v5p-64`
(benchmarks/RESULTS.md, "TPU readiness").
"""

import ml_collections

from vlm_jax.convert.hf import OPENAI_MEAN, OPENAI_STD
from vlm_jax.data.pipeline import record_check_config
from vlm_jax.defaults import base_config

# (frozen param regexes, batch, lr) per recipe; LoRA freezes through optim.lora instead.
RECIPES = {
    "stage1": (("vision/.*", "lm/.*"), 256, 1e-3),
    "stage2": (("vision/.*",), 128, 2e-5),
    "lora": ((), 128, 2e-4),
}
LLAMA2_VOCAB = 32_000  # the release tokenizer's ids; <image> is the next one


def get_config(arg=None):
    recipe = arg or "stage2"
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r} is not one of: {', '.join(RECIPES)}")
    freeze, batch, lr = RECIPES[recipe]
    c = base_config()
    c.task = "vlm"
    c.seed = 0

    c.data = ml_collections.ConfigDict(
        dict(source="vqa_folder", path="", image_size=336, flip=False, **record_check_config())
    )
    # pad: id 0 (Llama-2's <unk>), as LLaVA pads; the release has no pad token of its own
    c.tokenizer = ml_collections.ConfigDict(dict(name="hf", path="", pad_id=0, max_len=2048 - 576))

    c.model = ml_collections.ConfigDict()
    c.model.update(name="vlm", dtype="bfloat16", attention_impl="auto", remat=True, scan=True)
    c.model.fusion = "early"
    c.model.image_token_id = LLAMA2_VOCAB
    c.model.pad_id = 0  # = tokenizer.pad_id
    c.model.image = ml_collections.ConfigDict(
        dict(
            variant="L/14",
            width=1024,
            depth=24,
            num_heads=16,
            mlp_dim=4096,
            patch_size=14,
            image_size=336,
            posemb="learn",
            stem="patch",
            pool="cls",  # CLIP's class token (kept in the encoder, not passed on)
            ln_pre=True,
            patch_bias=False,
            dropout=0.0,
            # OpenAI CLIP's: what the converted tower computes with (init checks them)
            activation="quick_gelu",
            ln_eps=1e-5,
            input_mean=OPENAI_MEAN,
            input_std=OPENAI_STD,
        )
    )
    c.model.connector = ml_collections.ConfigDict(dict(name="mlp"))  # LLaVA-1.5's mlp2x_gelu
    c.model.lm = ml_collections.ConfigDict(
        dict(
            vocab_size=LLAMA2_VOCAB + 64,
            width=4096,
            depth=32,
            num_heads=32,
            num_kv_heads=32,
            mlp_dim=11008,
            rope_theta=10_000.0,
            tie_embeddings=False,
            norm_eps=1e-5,
            dropout=0.0,
        )
    )
    c.init.vision_checkpoint = ""  # a converted CLIP run (its image tower initialises `vision`)
    c.init.vision_key = "img"
    c.init.lm_checkpoint = ""  # a converted LM run (convert --from hf)

    c.mesh.shape = (-1, 8, 4)
    c.train.batch_size = batch
    c.train.total_steps = 5000
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.optim.lr = lr
    c.optim.warmup_steps = 150  # LLaVA: warmup ratio 0.03
    c.optim.weight_decay = 0.0
    c.optim.freeze = freeze
    if recipe == "lora":
        c.optim.lora = ml_collections.ConfigDict(
            dict(
                rank=128,
                alpha=256.0,
                dropout=0.05,
                targets=r"lm/.*/(attn|mlp)/[a-z]+/kernel",
                train=("connector/.*",),
            )
        )

    c.eval.tasks = ("vqa",)  # instruction data: answers to score, no reference captions
    c.eval.batch_size = 64
    c.eval.num_examples = 512
    c.eval.max_new_tokens = 32
    c.eval.split = "val"
    return c
