"""Shared test setup: one intra-op thread (tiny models are faster single-threaded, and CI has 2 cores)."""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
