"""AdamW with the paper's schedule (section 4.1): linear warmup to lr, cosine decay to final_lr,
global-norm clipping.

Weight decay (0.1, the paper follows Llama) is masked by parameter role, read off the name of
each leaf (`decay_mask`), never off its rank: `nn.scan` stacks the per-layer RMSNorm scales to
[depth, dim], which a rank rule would decay. Decayed: the weight matrices, i.e. the kernels of
Dense and conv layers (`kernel`), the attention projections (`query`, `key`, `value`, `out`),
the token embedding (`embed`) and with it the LM head's kernel. Not decayed: norm scales
(`scale`: RMSNorm, GroupNorm), biases (`bias`) and the patches' position table
(`patch_position`, as ViT and DiT leave theirs). A parameter of another name is refused
(ValueError naming it) rather than guessed at: add it to DECAYED or NOT_DECAYED.
"""
import jax
import optax

from transfusion_jax.core.validation import fraction, non_negative_int, non_negative_number, \
    positive_number

# config.optimizer's fields (core/validation.py); warmup_steps < total_steps is learning_rate's.
RULES = (
    ("optimizer.lr", positive_number),
    ("optimizer.final_lr", non_negative_number),
    ("optimizer.warmup_steps", non_negative_int),
    ("optimizer.b1", fraction()),
    ("optimizer.b2", fraction()),
    ("optimizer.eps", positive_number),
    ("optimizer.weight_decay", non_negative_number),
    ("optimizer.grad_clip", positive_number),
)

# Parameter names (the last key of a leaf's path) by whether weight decay applies.
DECAYED = frozenset({"kernel", "query", "key", "value", "out", "embed"})
NOT_DECAYED = frozenset({"scale", "bias", "patch_position"})


def learning_rate(opt, total_steps: int) -> optax.Schedule:
    if not 0 <= opt.warmup_steps < total_steps:
        raise ValueError(f"optimizer.warmup_steps={opt.warmup_steps} must be in [0, total_steps="
                         f"{total_steps})")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=opt.warmup_steps,
        decay_steps=total_steps, end_value=opt.final_lr)


def _leaf_name(path) -> str:
    """The last dict key of a leaf's path (boxed params add an attribute key after it)."""
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(names[-1]) if names else ""


def decay_mask(params):
    """The params tree with True where weight decay applies (see the module doc)."""
    def decayed(path, _):
        name = _leaf_name(path)
        if name in DECAYED:
            return True
        if name in NOT_DECAYED:
            return False
        raise ValueError(f"weight decay: parameter {jax.tree_util.keystr(path)} has the name "
                         f"{name!r}, in neither core/optim.py DECAYED {sorted(DECAYED)} nor "
                         f"NOT_DECAYED {sorted(NOT_DECAYED)}")
    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(opt, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip),
        optax.adamw(learning_rate(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                    weight_decay=opt.weight_decay, mask=decay_mask),
    )
