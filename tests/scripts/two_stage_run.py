"""A two-stage pipeline run for the fault-injection test (tests/test_faults.py):
`produce` counts to 40 (2.4 s) into its resumable scratch, then writes count.txt and a
model directory; `consume` sums count.txt into sum.txt. Both take long enough
(sleeps) for a kill to land inside them, in the swap, or between. Signals are
handled as in cai_jax.main (interrupts.py). With --sigint-in-gc, a garbage
collection callback sends the process SIGINT while `produce` runs (where a
KeyboardInterrupt used to be dropped, "Exception ignored in ...").

    python tests/scripts/two_stage_run.py WORKDIR [--sigint-in-gc]
"""
import gc
import os
import signal
import sys
import time

import ml_collections

from cai_jax import interrupts, pipeline

SIGINT_IN_GC = "--sigint-in-gc" in sys.argv[2:]
_armed = []


def _gc_callback(phase, info):
    if phase == "start" and _armed and _armed.pop():
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(1000))  # bytecode in the callback: the handler runs here


def produce(ctx):
    partial = ctx.path("count.partial")
    done = len(open(partial).read().splitlines()) if os.path.exists(partial) else 0
    with open(partial, "a") as f:
        for i in range(done, 40):
            f.write(f"{i}\n")
            f.flush()
            if SIGINT_IN_GC and i == 10:
                _armed.append(True)
                gc.collect()
            time.sleep(0.06)
    os.makedirs(ctx.path("model"), exist_ok=True)
    with open(ctx.path("model", "weights.bin"), "wb") as f:
        f.write(bytes(range(256)) * 4096)  # 1 MiB, so writing it takes a moment
    os.replace(partial, ctx.path("count.txt"))
    return {"resumed_from": done}


def consume(ctx):
    with open(ctx.path("count.txt")) as f:
        total = sum(int(line) for line in f)
    time.sleep(1.5)
    with open(ctx.path("sum.txt"), "w") as f:
        f.write(str(total))
    return {"sum": total}


def main():
    module = type(sys)("two_stage_run_module")
    module.produce, module.consume = produce, consume
    sys.modules["two_stage_run_module"] = module
    pipeline.STAGES = {
        "produce": pipeline.Stage("produce", "two_stage_run_module:produce", ("a",),
                                  outputs=("count.txt", "model"), scratch=("count.partial",)),
        "consume": pipeline.Stage("consume", "two_stage_run_module:consume", ("a",),
                                  inputs=("count.txt",), outputs=("sum.txt",)),
    }
    pipeline.ORDER = ("produce", "consume")
    pipeline.run_pipeline(ml_collections.ConfigDict({"a": {"x": 1}}), sys.argv[1], progress=False)
    print("complete", flush=True)


if __name__ == "__main__":
    interrupts.install()
    print("ready", flush=True)  # the test times its signal from here: one sent earlier would meet no handler
    gc.callbacks.append(_gc_callback)
    interrupts.call(main)
