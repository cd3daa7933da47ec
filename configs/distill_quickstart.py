"""Knowledge distillation on a CPU: quickstart's decoder at half the width and half the layers
(~1M parameters besides the embeddings), trained on the same corpus against the softened next-
token distributions of a quickstart run:

    python -m train --config configs/quickstart.py --workdir runs/quickstart
    python -m train --config configs/distill_quickstart.py --workdir runs/student \\
        --config.distill.teacher=runs/quickstart@best

Without distill.teacher it trains the same student from scratch (the baseline; give it the
teacher's vocabulary: --config.data.tokenizer.path=runs/quickstart/tokenizer.model).
"""
from configs.quickstart import get_config as quickstart


def get_config():
    c = quickstart()
    c.model.update(d_model=128, n_heads=2, n_layers=2, d_ff=352)
    c.distill.update(alpha=0.5, temperature=2.0)
    return c
