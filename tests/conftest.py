"""Suite-wide setup. CI has no GPU: Triton kernels run under the interpreter there.

NOTE: TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before the
first import of appliance_kernels.*; setting it here, at collection start, guarantees that.
"""

from __future__ import annotations

import os

# NOTE: before torch loads OpenMP (see appliance/cli.py: spinning workers under contention).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep CPU tests predictable on the 2-core CI machine.
# NOTE: one intra-op thread: several engine threads and servers share the 2 CI cores, and OpenMP
# spin-waiting under oversubscription made steps 10x slower than a single thread.
torch.set_num_threads(int(os.environ.get("LLM_APPLIANCE_TEST_THREADS", "1")))
