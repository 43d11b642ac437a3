"""AdamW with the paper's schedule (section 4.1): linear warmup to lr, cosine decay to final_lr,
global-norm clipping. Weight decay applies to matrices only (not to norm scales or biases)."""
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


def learning_rate(opt, total_steps: int) -> optax.Schedule:
    if not 0 <= opt.warmup_steps < total_steps:
        raise ValueError(f"optimizer.warmup_steps={opt.warmup_steps} must be in [0, total_steps="
                         f"{total_steps})")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=opt.warmup_steps,
        decay_steps=total_steps, end_value=opt.final_lr)


def make_optimizer(opt, total_steps: int) -> optax.GradientTransformation:
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip),
        optax.adamw(learning_rate(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                    weight_decay=opt.weight_decay, mask=decay_mask),
    )
