"""One all-reduce across the workers of TF_CONFIG, timed: run one process per worker.

Prints, on the chief, one JSON line: seconds per all-reduce of the metrics (4 float32
numbers, once a step) and of a gradient-sized tensor (the CNN's weights at --size 32,
10 classes: 1,250,858 float32 numbers, once a step), each the median of batches of calls.
Used by run_bench.py; the same strategy and timeouts as `pipeline train`.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from pipeline.core.native_stderr import import_tensorflow
from pipeline.training import distribute

SIZES = {"metrics (4 floats)": 4, "gradients (1,250,858 floats, 4.8 MB)": 1_250_858}


def main() -> None:
    plan = distribute.plan_training(distribute.read_cluster())
    tf = import_tensorflow()
    found = {}
    for what, n in SIZES.items():
        value = tf.zeros([n], tf.float32)

        @tf.function
        def reduce_once(value=value):
            ctx_sum = lambda v: tf.distribute.get_replica_context().all_reduce("SUM", tf.identity(v))  # noqa: E731
            return plan.strategy.experimental_local_results(plan.strategy.run(ctx_sum, args=(value,)))[0]

        reduce_once().numpy()  # trace and first exchange
        batches = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(10):
                result = reduce_once()
            result.numpy()
            batches.append((time.perf_counter() - started) / 10)
        found[what] = statistics.median(batches)
    plan.barrier("finishing the all-reduce bench")
    if plan.is_chief:
        print(json.dumps({"workers": plan.workers, "seconds": found}), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
