"""Launcher entry point: the same training code under every launcher.

    deepspeed --num_gpus 8 launch/train.py --stage multitask --data DATA --run-dir RUN
    deepspeed --hostfile launch/hostfile launch/train.py --stage multitask --data DATA --run-dir RUN
    torchrun --nproc_per_node 8 launch/train.py --stage supervised --data DATA --run-dir RUN
    torchrun --nnodes 2 --node_rank N --master_addr HOST --master_port 29500 --nproc_per_node 8 launch/train.py ...
"""
import sys

from dlscale.train import main

if __name__ == "__main__":
    sys.exit(main())
