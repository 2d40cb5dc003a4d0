"""`speed-kernels` with a pause inside every checkpoint write (between the temp file and its fsync),
for tests/train/test_checkpoint_faults.py: a SIGKILL sent while the temp file exists lands mid-write."""
import sys
import time

from speed_train import checkpoint, cli

checkpoint._before_fsync = lambda: time.sleep(0.15)

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
