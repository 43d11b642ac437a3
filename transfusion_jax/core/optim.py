"""AdamW with the paper's schedule (section 4.1): linear warmup to lr, cosine decay to final_lr,
global-norm clipping. Weight decay applies to matrices only (not to norm scales or biases)."""
import jax
import optax


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
