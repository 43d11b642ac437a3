"""Sample grids: images for fixed prompts, for looking at (type "sample_grid").

Options: prompts (default: the first `num` held-out captions of the shapes world when the run
trains on it), sampler / steps / guidance (a fast sampler: DPM-Solver++ 2M, 20 steps, CFG 3).
Writes text_to_image.png (a row per prompt) into evals/<step>/<name>/. All prompts are one
generation, one batch: with several processes, process 0 draws it (evaluators/common.py).
A Chameleon run (config.model.family) samples its images as VQ-VAE tokens (sampler and steps
not used; guidance on their logits, its experiment sets the paper's 5) and decodes them with
its VQ-VAE (inference/tasks.py).
"""
from typing import Sequence

from transfusion_jax.core import distributed
from transfusion_jax.data.shapes.heldout import heldout_scenes
from transfusion_jax.inference.tasks import Sampling, run_tasks


class Evaluator:
    def __init__(self, context, prompts: Sequence[str] = (), num: int = 4,
                 sampler: str = "dpm++2m", steps: int = 20, guidance: float = 3.0):
        data = context.config.data
        prompts = list(prompts)
        if not prompts and data.image_source == "shapes":
            prompts = heldout_scenes(data.shapes_seed, num, data.image_size)[0]
        if not prompts:
            raise ValueError("prompts: empty, and the run does not train on the shapes world "
                             "(data.image_source) to take held-out captions from; give prompts")
        self.context, self.prompts = context, prompts
        self.sampling = Sampling(sampler=sampler, steps=steps, guidance=guidance,
                                 max_new_tokens=48, num_samples=1)

    def run(self, variables, out_dir: str) -> dict:
        # One batch (one generation, one grid): process 0's, which writes it; the others only
        # learn its count.
        made = {}
        if distributed.mine(0):
            c = self.context
            records = run_tasks(c.config, variables, c.tokenizer, self.sampling,
                                prompts=self.prompts, out=out_dir or None, codec=c.codec)
            made[0] = sum(r["images"] for r in records)
        return {"images": distributed.gather_batches(made)[0]}
