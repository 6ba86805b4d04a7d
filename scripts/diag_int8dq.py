"""Why torchao int8dq's decode cannot be captured in a CUDA graph (prints the first error)."""

import traceback

import lowbit
from lowbit.engine import runner as R

orig = R.ModelRunner._capture_graphs


def cap(self):
    try:
        orig(self)
    except Exception as e:
        first = e
        while first.__context__ is not None:
            first = first.__context__
        print("".join(traceback.format_exception(first))[-3000:])
        raise


R.ModelRunner._capture_graphs = cap
e = lowbit.Engine(device="cuda", torchao_config="int8dq", max_total_tokens=4096)
print("graphs:", bool(e.runner.graphs))
