"""Two calls with gpus_per_core=1 on the local backend, held at the same time; prints
the CUDA_VISIBLE_DEVICES each saw and this process's, as JSON.

    python local_gpus.py WORK_DIRECTORY
"""

import json
import os
import sys
import time

from executorlib import Executor

work = sys.argv[1]


def hold_gpu(path):
    with open(f"{path}.{os.getpid()}", "w") as file:  # tell the caller: started
        file.write(os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    while not os.path.exists(f"{path}.release"):  # hold the GPU until both have started
        time.sleep(0.05)
    return os.environ.get("CUDA_VISIBLE_DEVICES")


path = os.path.join(work, "gpu")
with Executor(max_workers=2, resource_dict={"gpus_per_core": 1}) as exe:
    futures = [exe.submit(hold_gpu, path) for _ in range(2)]
    while sum(name.startswith("gpu.") for name in os.listdir(work)) < 2:
        if any(f.done() for f in futures):
            break
        time.sleep(0.05)
    open(f"{path}.release", "w").close()
    seen = [f.result(timeout=120) for f in futures]
print(json.dumps({"workers": seen, "mine": os.environ.get("CUDA_VISIBLE_DEVICES")}))
