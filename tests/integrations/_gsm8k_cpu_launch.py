"""Run ``examples/gsm8k.py`` under the DeepSpeed launcher on CPU (gloo), unmodified.

``deepspeed --num_gpus N tests/integrations/_gsm8k_cpu_launch.py <gsm8k args>`` starts N ranks of
this script; each runs the example as ``__main__`` with the launcher's argv (``--local_rank=i``
included). Two CPU-only adjustments are injected, both no-ops on a GPU machine:

* accelerate's process state is created with gloo for DeepSpeed and the example's
  ``TrainingArguments`` reuse it (:func:`hyclora.integrations.accelerate.trainer_cpu_deepspeed_kwargs`);
  without it accelerate believes it runs one process while DeepSpeed sees N, and
  ``deepspeed.initialize`` fails on the batch-size check;
* DeepSpeed's shared-memory all-reduce extension is not JIT-compiled (gloo does the work).

Once ``hyclora.training.parse_finetune_args`` applies the first adjustment itself, only the
second one remains here.
"""

import importlib
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "gsm8k.py"

importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

from hyclora.integrations.accelerate import trainer_cpu_deepspeed_kwargs  # noqa: E402
import hyclora.training as training  # noqa: E402

_extra = trainer_cpu_deepspeed_kwargs()
_parse = training.parse_finetune_args


def _parse_with_cpu_state(task, argv=(), **overrides):
    return _parse(task, argv, **{**_extra, **overrides})


training.parse_finetune_args = _parse_with_cpu_state
sys.argv[0] = str(EXAMPLE)
runpy.run_path(str(EXAMPLE), run_name="__main__")
