"""A child process of the dataset tests: one rank of a gloo run, or a run that is killed mid-way.

    python dataset_worker.py MODE OUT [CHECKPOINT]

The data are x.npy and y.npy in OUT's folder (:func:`dataset_common.save_digits`).

MODE ``rank``: join the process group from the environment (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), run reconstruct_dataset on the digits test split by label, rank 0 saves OUT.
MODE ``die``: as ``rank``, but rank 1 exits (os._exit) after its first batch.
MODE ``slow``: one process, checkpoint every batch, a sleep after each batch (to be killed).
"""

import os
import sys
import time
from pathlib import Path
from datetime import timedelta

import torch

sys.path.insert(0, os.path.dirname(__file__))
import reconviz.dataset.run as run  # noqa: E402
from dataset_common import digits_model, load_digits_files  # noqa: E402
from reconviz.dataset import DistributedError, reconstruct_dataset  # noqa: E402

BATCH = 64  # slow mode: 300 digits in 5 batches
RANK_BATCH = 32  # rank / die modes: 128 digits in 4 batches


def main() -> int:
    torch.set_num_threads(int(os.environ.get("RV_THREADS", "1")))
    mode, out = sys.argv[1], sys.argv[2]
    model, data = digits_model(), load_digits_files(Path(out).parent)
    if mode == "slow":
        run.after_batch = lambda n: time.sleep(0.15)
        ts = reconstruct_dataset(model, data, batch_size=BATCH, checkpoint=sys.argv[3], checkpoint_every=1)
        ts.save(out)
        return 0
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    if mode == "die" and dist.get_rank() == 1:
        run.after_batch = lambda n: os._exit(7)
    try:
        ts = reconstruct_dataset(model, data, batch_size=RANK_BATCH)
    except DistributedError as e:
        print(f"DistributedError: {e}", file=sys.stderr)
        return 5
    if dist.get_rank() == 0:
        ts.save(out)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
